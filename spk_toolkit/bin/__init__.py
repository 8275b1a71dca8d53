"""Command-line entry points: argparse plus one library call each."""
