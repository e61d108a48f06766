"""Named recipes: TOML files in the top-level ``export/`` and ``train/`` folders.

They ship in the wheel as ``maskattn_deploy.recipes.export`` / ``.train``. A recipe argument is
either a name (``tiny``) or a path to a ``.toml`` file.
"""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from maskattn_deploy.errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

RecipeKind = Literal["export", "train"]


def recipe_names(kind: RecipeKind) -> list[str]:
    folder = resources.files(f"maskattn_deploy.recipes.{kind}")
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".toml"))


def load_recipe(kind: RecipeKind, name_or_path: str | Path) -> dict[str, Any]:
    """Parse a recipe by name or path; unknown names list the available ones."""
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise UserError(f"recipe file {path} does not exist")
        text = path.read_text()
        source = str(path)
    else:
        resource = resources.files(f"maskattn_deploy.recipes.{kind}") / f"{name_or_path}.toml"
        if not resource.is_file():
            raise UserError(
                f"unknown {kind} recipe {name_or_path!r}; available: {', '.join(recipe_names(kind))} "
                "(or pass a path to a .toml file)"
            )
        text = resource.read_text()
        source = f"{kind}/{name_or_path}.toml"
    try:
        recipe = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"recipe {source} is not valid TOML: {exc}") from exc
    recipe.setdefault("name", Path(source).stem)
    recipe["_source"] = source
    return recipe
