"""Rules of the test suite shared by conftest.py and the tests (docs/testing.md)."""
from __future__ import annotations

import os

#: the tag a skip reason carries when the machine cannot have the part (no root or no network to install SLURM); any
#: other skip is a failure in CI, where `make setup` installs every part the suite uses
ENVIRONMENT_SKIP = "[environment]"


def in_ci() -> bool:
    """True when ``CI`` is ``true`` / ``1`` / ``yes`` (GitHub Actions, GitLab and most CI services set it)."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")
