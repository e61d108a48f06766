"""Running our plugin through NVIDIA's ``tensorrt.plugin`` sources without TensorRT.

:func:`run_probe` runs ``tests/_qdp_probe.py`` (in this or another interpreter, e.g. a side venv
with another Triton) on a request and returns what TensorRT would have received.
:func:`creator_fields` is the plugin creator's field list as NVIDIA's registration makes it.

The sources come from the bindings wheels on PyPI, cached:

The wheels (``tensorrt-cu12-bindings`` 10.x, ``tensorrt-cu13-bindings`` 11.x) cannot be
imported without NVIDIA's libraries, but their ``tensorrt_bindings/plugin/*.py`` is plain
Python: the registration, validation and plugin classes that TensorRT runs for a Python
plugin. :func:`bindings_dir` downloads a wheel once with pip (the same way
``scripts/extract_trt_api_names.py`` does) and keeps only those sources under
``<repo>/.cache/trt-wheels/<version>/``. When the registry cannot be reached the calling test
is skipped with that reason; any other failure fails it.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import pytest
from _venvs import _OFFLINE_SIGNS

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache" / "trt-wheels"
_SCRIPT = ROOT / "scripts" / "extract_trt_api_names.py"
PROBE = Path(__file__).resolve().parent / "_qdp_probe.py"
NEWEST_WHEEL = "11.4.0.106"
_PREFIX = "tensorrt_bindings/"


def _script():
    spec = importlib.util.spec_from_file_location("extract_trt_api_names", _SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def wheel_versions() -> tuple[str, ...]:
    """The bindings versions the repository checks against (10.9 is the first with AOT plugins)."""
    return tuple(_script().DEFAULT_VERSIONS)


def bindings_dir(version: str) -> Path:
    """``.../tensorrt_bindings`` of the ``version`` wheel, holding ``plugin/*.py``."""
    folder = CACHE / version
    target = folder / "tensorrt_bindings"
    if (target / "plugin" / "__init__.py").is_file():
        return target
    CACHE.mkdir(parents=True, exist_ok=True)
    with (CACHE / f"{version}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "plugin" / "__init__.py").is_file():
            return target
        script = _script()
        with tempfile.TemporaryDirectory() as tmp:
            try:
                wheel = script.download(script.package_for(version), version, Path(tmp))
            except subprocess.CalledProcessError as exc:
                output = f"{exc.stdout}{exc.stderr}"
                if any(sign in output for sign in _OFFLINE_SIGNS):
                    pytest.skip(
                        f"package registry unreachable while downloading TensorRT {version}"
                    )
                pytest.fail(
                    f"pip could not download the TensorRT {version} bindings:\n{output[-3000:]}"
                )
            staging = Path(tmp) / "out"
            with zipfile.ZipFile(wheel) as zf:
                for name in zf.namelist():
                    if name.startswith(f"{_PREFIX}plugin/") and name.endswith(".py"):
                        zf.extract(name, staging)
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            (staging / _PREFIX).rename(target)
    return target


def probe_command(python: str | Path, request: dict[str, Any]) -> tuple[list[str], dict, str]:
    """(argv, environment, stdin) to run the probe on ``request`` with ``python``."""
    wheels = {v: str(bindings_dir(v)) for v in {r["wheel"] for r in request["runs"]}}
    full = {"repo": str(ROOT), "wheels": wheels, **request}
    env = {**os.environ, "TRITON_DEFAULT_FP_FUSION": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    return [str(python), str(PROBE)], env, json.dumps(full)


def finish_probe(returncode: int, stdout: str, stderr: str) -> dict[str, Any]:
    """The probe's result, or a test failure with its stderr."""
    if returncode != 0:
        pytest.fail(f"the plugin probe failed (rc {returncode}):\n{stderr[-4000:]}")
    return json.loads(stdout)


def run_probe(request: dict[str, Any], python: str | Path = sys.executable) -> dict[str, Any]:
    """Run the probe on ``request`` and return its result (fails the test if it crashes)."""
    argv, env, stdin = probe_command(python, request)
    proc = subprocess.run(argv, input=stdin, capture_output=True, text=True, env=env, timeout=1800)
    return finish_probe(proc.returncode, proc.stdout, proc.stderr)


def creator_fields(wheel: str = NEWEST_WHEEL) -> list[tuple[str, str]]:
    """The plugin creator's ``(field, PluginFieldType)`` list, as NVIDIA's registration makes it."""
    result = run_probe({"runs": [{"wheel": wheel, "tiling": None, "cases": []}]})
    return [tuple(field) for field in result["runs"][0]["creator"]["fields"]]
