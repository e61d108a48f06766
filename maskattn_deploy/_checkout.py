"""Run from a source checkout exactly as from the wheel.

pyproject's ``package-dir`` ships the top-level ``plugins/``, ``export/`` and ``train/`` folders
inside the wheel as ``maskattn_deploy.plugins`` and ``maskattn_deploy.recipes.{export,train}``.
When Python imports ``maskattn_deploy`` from the checkout itself (``python -m
maskattn_deploy.cli.main`` started in the repository root, a bare checkout on a lent GPU
machine), those sub-packages are not inside ``maskattn_deploy/``. This finder maps them onto
the checkout's folders, the way the wheel does; it answers only for those three names, and only
after every other finder (an installed or editable package) has had its turn.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
from pathlib import Path

CHECKOUT_FOLDERS = {
    "maskattn_deploy.plugins": "plugins",
    "maskattn_deploy.recipes.export": "export",
    "maskattn_deploy.recipes.train": "train",
}


class CheckoutFinder(importlib.abc.MetaPathFinder):
    """Finds the mapped sub-packages in ``root`` (the folder that holds ``maskattn_deploy/``)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def find_spec(
        self, fullname: str, path: object = None, target: object = None
    ) -> importlib.machinery.ModuleSpec | None:
        folder = CHECKOUT_FOLDERS.get(fullname)
        if folder is None:
            return None
        init = self.root / folder / "__init__.py"
        if not init.is_file():
            return None
        return importlib.util.spec_from_file_location(
            fullname, init, submodule_search_locations=[str(init.parent)]
        )


def install(package_dir: Path) -> None:
    """Append the finder when ``package_dir`` lies in a checkout (``pyproject.toml`` beside it)."""
    root = package_dir.parent
    if not (root / "pyproject.toml").is_file() or (package_dir / "plugins").is_dir():
        return
    if not any(isinstance(f, CheckoutFinder) for f in sys.meta_path):
        sys.meta_path.append(CheckoutFinder(root))
