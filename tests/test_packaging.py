"""What `pip install .` ships: every package of the source tree (the tests import from the
tree, so a package missing from pyproject.toml would pass them and fail once installed)."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_package_is_shipped() -> None:
    with open(ROOT / "pyproject.toml", "rb") as f:
        listed = set(tomllib.load(f)["tool"]["setuptools"]["packages"])
    packages = {".".join(init.parent.relative_to(ROOT).parts)
                for init in (ROOT / "equalizer").rglob("__init__.py")}
    assert packages - listed == set()
    assert "twisted.plugins" in listed  # the twistd plugin, twisted/plugins/equalizer_plugin.py
