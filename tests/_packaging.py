"""pyproject.toml for the packaging tests (tomllib from 3.11, its backport tomli on 3.10)."""

import sys
from pathlib import Path

REPO = Path(__file__).parents[1]


def pyproject() -> dict:
    if sys.version_info >= (3, 11):
        import tomllib  # novermin (3.10 takes the branch below)
    else:  # pragma: no cover
        import tomli as tomllib
    return tomllib.loads((REPO / "pyproject.toml").read_text())
