"""spk_toolkit."""
