"""Regenerate ``maskattn_deploy/engine/trt_api_names.json``: TensorRT's Python API names per version.

TensorRT cannot be installed without NVIDIA's package index, but PyPI carries the Python
bindings wheels (``tensorrt-cu12-bindings`` for 10.x, ``tensorrt-cu13-bindings`` for 11.x).
They cannot be imported without the libraries, yet their compiled extension holds every
pybind11 attribute name as a NUL-terminated string, and ``tensorrt/plugin`` ships as Python
source. This script downloads each wheel with pip (no install), collects

* identifier-like strings of the extension (C++ mangled symbols dropped), and
* every name defined or referenced in the wheel's Python sources (AST),

and writes them to the JSON file that ``tests/test_trt_api_names.py`` checks our code against.
The linker merges string tails ("IBuilder" also serves "Builder"), so a name counts as present
when it equals a stored string or is a tail of one; the test applies that rule.

Usage: ``python scripts/extract_trt_api_names.py [--out PATH] [--versions 10.9.0.34 ...]``
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

DEFAULT_VERSIONS = ("10.9.0.34", "10.16.1.11", "11.4.0.106")
OUT = Path(__file__).resolve().parents[1] / "maskattn_deploy" / "engine" / "trt_api_names.json"
_IDENT = re.compile(rb"(?<=\x00)([A-Za-z_][A-Za-z0-9_]{1,80})\x00")
_MANGLED = re.compile(r"^(_Z|_GLOBAL|ZN|ZNK|PF|N\d|St\d|S\d|[A-Z]?N?\d)")


def package_for(version: str) -> str:
    """TensorRT 10 bindings are published for CUDA 12, TensorRT 11 for CUDA 12 and 13."""
    return (
        "tensorrt-cu13-bindings" if int(version.split(".")[0]) >= 11 else "tensorrt-cu12-bindings"
    )


def download(package: str, version: str, dest: Path) -> Path:
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--python-version", "3.11", "--platform", "manylinux_2_28_x86_64",
        f"{package}=={version}", "-d", str(dest), "-q",
    ]  # fmt: skip
    subprocess.run(
        cmd, check=True, capture_output=True, text=True
    )  # the error carries pip's output
    return next(dest.glob(f"{package.replace('-', '_')}-{version}*.whl"))


def binary_names(data: bytes) -> set[str]:
    names = {m.group(1).decode() for m in _IDENT.finditer(data)}
    return {n for n in names if not _MANGLED.match(n)}


def source_names(source: str) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Attribute):
            names.add(node.attr)
        elif isinstance(node, ast.Name):
            names.add(node.id)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
    return names


def wheel_names(wheel: Path) -> tuple[set[str], set[str]]:
    """(names from compiled extensions, names from Python sources) of one bindings wheel."""
    binary, python = set(), set()
    with zipfile.ZipFile(wheel) as zf:
        for info in zf.infolist():
            if info.filename.endswith(".so"):
                binary |= binary_names(zf.read(info))
            elif info.filename.endswith(".py"):
                python |= source_names(zf.read(info).decode("utf-8", errors="replace"))
    return binary, python


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--versions", nargs="+", default=list(DEFAULT_VERSIONS))
    args = parser.parse_args(argv)
    result: dict[str, object] = {
        "about": "TensorRT Python API names per bindings wheel; regenerate with "
        "scripts/extract_trt_api_names.py. A name is present if it equals an entry or is a "
        "tail of a 'binary' entry (linker string-tail merging).",
        "versions": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for version in args.versions:
            package = package_for(version)
            wheel = download(package, version, Path(tmp))
            binary, python = wheel_names(wheel)
            result["versions"][version] = {  # type: ignore[index]
                "package": package,
                "wheel": wheel.name,
                "binary": sorted(binary),
                "python": sorted(python - binary),
            }
            print(f"{wheel.name}: {len(binary)} binary names, {len(python)} Python names")
    args.out.write_text(json.dumps(result, indent=0, sort_keys=True) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
