"""A runtime backend whose components are other models of the same Triton server (BLS).

Inside the pipeline model, :class:`BlsComponentRunner` turns a component call (the feed of
:mod:`maskattn_deploy.export.spec`'s contract) into a Business Logic Scripting request to the
model serving that component, for example the ``tensorrt_plan`` model of the UNet engine, and
returns its outputs as torch tensors. Tensors travel through DLPack, so GPU outputs of a
TensorRT plan stay on the GPU. Only usable inside Triton's Python backend.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from maskattn_deploy.errors import UserError
from maskattn_deploy.export.folder import ExportManifest
from maskattn_deploy.runtime.base import Backend, ComponentRunner, Feed, as_tensor

_TORCH_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "int64": torch.int64,
    "int32": torch.int32,
}


class BlsComponentRunner(ComponentRunner):
    """One component served by the Triton model ``model_name``."""

    def __init__(
        self,
        component: str,
        model_name: str,
        dtypes: Mapping[str, str],
        outputs: tuple[str, ...] | None = None,
    ) -> None:
        super().__init__(component, outputs)
        self.model_name = model_name
        self.dtypes = dict(dtypes)  # input name -> dtype the model expects

    def describe(self) -> str:
        return f"Triton model {self.model_name} (BLS)"

    def _activate(self) -> None:
        import triton_python_backend_utils as pb_utils

        self.pb = pb_utils

    def _deactivate(self) -> None:
        pass

    def _infer(self, feed: Feed) -> dict[str, torch.Tensor]:
        pb = self.pb
        inputs = []
        for name, value in feed.items():
            dtype = _TORCH_DTYPES.get(self.dtypes.get(name, "float32"), torch.float32)
            tensor = as_tensor(value).to(dtype).contiguous()
            inputs.append(pb.Tensor.from_dlpack(name, torch.utils.dlpack.to_dlpack(tensor)))
        request = pb.InferenceRequest(
            model_name=self.model_name,
            inputs=inputs,
            requested_output_names=list(self.output_names),
        )
        response = request.exec()
        if response.has_error():
            raise UserError(f"{self.model_name}: {response.error().message()}")
        outputs = {}
        for name in self.output_names:
            tensor = pb.get_output_tensor_by_name(response, name)
            if tensor is None:
                raise UserError(f"{self.model_name} returned no {name!r}")
            outputs[name] = torch.utils.dlpack.from_dlpack(tensor.to_dlpack())
        return outputs


def bls_backend(
    component_models: Mapping[str, str],
    manifest: ExportManifest,
    export_dir: Any,
    name: str = "tensorrt",
) -> Backend:
    """A backend calling ``component_models`` (component -> model name) over BLS; components
    without a model run on ONNX Runtime in this process (like the tensorrt backend does)."""
    from maskattn_deploy.export.component_spec import runtime_outputs
    from maskattn_deploy.runtime.base import PIPELINE_COMPONENTS
    from maskattn_deploy.runtime.ort_backend import ort_backend

    local = [c for c in PIPELINE_COMPONENTS if c not in component_models]
    runners: dict[str, ComponentRunner] = {}
    if local:
        runners.update(ort_backend(export_dir, manifest, "auto", tuple(local)).runners)
    for component, model in component_models.items():
        entry = manifest.components[component]
        dtypes = {t["name"]: t.get("dtype", "float32") for t in entry.inputs}
        outputs = runtime_outputs(component, [o["name"] for o in entry.outputs])
        runners[component] = BlsComponentRunner(component, model, dtypes, outputs)
    device = "cuda" if name == "tensorrt" and torch.cuda.is_available() else "cpu"
    return Backend(name, runners, device)
