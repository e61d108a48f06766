"""The source checkout imports the sub-packages the wheel maps in from plugins/, export/, train/.

CI installs the wheel (not editable) and starts the CLI with ``python -m`` in the repository
root, where the checkout's ``maskattn_deploy/`` shadows the installed one; these imports must
resolve to the checkout's top-level folders there too.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PROBE = """
import json, sys
sys.path.insert(0, sys.argv[1])
import maskattn_deploy.plugins.kernel_resources as k
import maskattn_deploy.recipes.export as e
import maskattn_deploy.recipes.train as t
from maskattn_deploy.recipes import recipe_names
print(json.dumps({"plugins": k.__file__, "export": e.__file__, "train": t.__file__,
                  "package": sys.modules["maskattn_deploy"].__file__,
                  "recipes": recipe_names("export") + recipe_names("train")}))
"""


def test_checkout_maps_plugins_and_recipes_without_an_install() -> None:
    # -S: no site-packages, so neither an installed wheel nor an editable finder can help.
    proc = subprocess.run(
        [sys.executable, "-S", "-c", PROBE, str(ROOT)], capture_output=True, text=True, check=True
    )
    found = json.loads(proc.stdout)
    assert Path(found["package"]).parent == ROOT / "maskattn_deploy"
    assert Path(found["plugins"]) == ROOT / "plugins" / "kernel_resources.py"
    assert Path(found["export"]) == ROOT / "export" / "__init__.py"
    assert Path(found["train"]) == ROOT / "train" / "__init__.py"
    expected = sorted(p.stem for p in (ROOT / "export").glob("*.toml"))
    expected += sorted(p.stem for p in (ROOT / "train").glob("*.toml"))
    assert found["recipes"] == expected
