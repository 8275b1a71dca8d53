"""Shared CLI plumbing: ``--config file.yaml`` whose keys are long option names (unknown keys are errors)."""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional, Sequence


def str2bool(v: str) -> bool:
    """Parse ``true/false/1/0/yes/no`` (argparse type)."""
    if isinstance(v, bool):
        return v
    if v.lower() in ("true", "1", "yes", "y"):
        return True
    if v.lower() in ("false", "0", "no", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {v!r}")


def parse_args(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse ``argv`` with defaults taken from ``--config`` (YAML mapping of long option names).

    Command-line flags override the config file. Raises ``SystemExit`` (via ``parser.error``) for a config key
    that is not an option of ``parser``, naming the key and the file.
    """
    import yaml

    parser.add_argument("--config", help="YAML file whose keys are long option names (command line wins)")
    pre, _ = parser.parse_known_args(argv)
    if pre.config:
        with open(pre.config) as f:
            cfg = yaml.safe_load(f) or {}
        if not isinstance(cfg, dict):
            parser.error(f"{pre.config}: expected a mapping of option names to values")
        known = {a.dest for a in parser._actions}
        unknown = sorted(set(cfg) - known)
        if unknown:
            parser.error(f"{pre.config}: unknown option(s) {', '.join(unknown)}")
        for k, v in cfg.items():
            if isinstance(v, list) and k not in ("trials",):
                cfg[k] = ",".join(map(str, v))
        parser.set_defaults(**cfg)
    return parser.parse_args(argv)


def setup_logging(verbose: int = 0) -> None:
    """Log to stderr: WARNING by default, INFO with -v, DEBUG with -vv."""
    level = logging.WARNING if verbose <= 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
