"""ONNX export of the gated SDXL pipeline (``maskattn-deploy export``).

``from maskattn_deploy.export import export_pipeline`` is the entry point; the names below
are loaded on first use so importing the package stays cheap (no torch, onnx or onnxruntime).
The folder layout lives in :mod:`maskattn_deploy.export.spec`, each component's tensors in
:mod:`maskattn_deploy.export.component_spec`, the manifest reader in
:mod:`maskattn_deploy.export.folder`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from maskattn_deploy.export.folder import ExportFolder
    from maskattn_deploy.export.pipeline import ExportOptions, export_pipeline, export_unet
    from maskattn_deploy.export.results import ComponentResult, ExportResult

_LAZY = {
    "export_pipeline": "maskattn_deploy.export.pipeline",
    "export_unet": "maskattn_deploy.export.pipeline",
    "ExportOptions": "maskattn_deploy.export.pipeline",
    "ExportResult": "maskattn_deploy.export.results",
    "ComponentResult": "maskattn_deploy.export.results",
    "ExportFolder": "maskattn_deploy.export.folder",
}

__all__ = [
    "ComponentResult",
    "ExportFolder",
    "ExportOptions",
    "ExportResult",
    "export_pipeline",
    "export_unet",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
