"""ONNX export of the gated SDXL pipeline (``maskattn-deploy export``).

``from maskattn_deploy.export import export_pipeline`` is the entry point; the names below
are loaded on first use so importing the package stays cheap (no torch, onnx or onnxruntime).
The folder contract (layout, tensor names) lives in :mod:`maskattn_deploy.export.spec`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from maskattn_deploy.export.pipeline import (
        ComponentResult,
        ExportResult,
        export_pipeline,
        export_unet,
    )

_LAZY = {
    "export_pipeline": "maskattn_deploy.export.pipeline",
    "export_unet": "maskattn_deploy.export.pipeline",
    "ExportResult": "maskattn_deploy.export.pipeline",
    "ComponentResult": "maskattn_deploy.export.pipeline",
}

__all__ = ["ComponentResult", "ExportResult", "export_pipeline", "export_unet"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
