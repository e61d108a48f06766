"""Lazy imports of optional stacks with errors that name the fix."""

from __future__ import annotations

import importlib
from types import ModuleType

from maskattn_deploy.errors import UserError

# module name -> (pip extra or package, extra advice)
_INSTALL_HINTS: dict[str, str] = {
    "tensorrt": "pip install 'maskattn-deploy[trt]' --extra-index-url https://pypi.nvidia.com "
    "on a machine with an NVIDIA GPU",
    "polygraphy": "pip install polygraphy",
    "onnxruntime": "pip install onnxruntime (or onnxruntime-gpu for CUDA)",
    "triton": "pip install 'maskattn-deploy[kernels]'",
    "accelerate": "pip install 'maskattn-deploy[train]'",
    "cuda": "pip install cuda-python",
    "tritonclient": "pip install 'maskattn-deploy[serve]'",
    "pytriton": "pip install 'maskattn-deploy[serve]'",
}


class MissingDependencyError(UserError):
    """An optional dependency is missing; the message says how to install it."""


def install_hint(module: str) -> str:
    return _INSTALL_HINTS.get(module.split(".")[0], f"pip install {module.split('.')[0]}")


def require(module: str, purpose: str = "") -> ModuleType:
    """Import ``module`` or raise :class:`MissingDependencyError` naming the install command."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        what = f" (needed for {purpose})" if purpose else ""
        raise MissingDependencyError(
            f"{module.split('.')[0]} is not installed{what}: {install_hint(module)}"
        ) from exc


def available(module: str) -> bool:
    """True when ``module`` can be found, without importing it."""
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False
