"""The ``torch`` backend: diffusers modules (gate processors installed) behind the component contract.

It is the reference every other backend is compared with. Each runner takes the exact feed an
exported component takes (same names, shapes and meaning, see
:mod:`maskattn_deploy.export.component_spec`) and runs the spec's module adapter, the very
module the exporter traces, so parity checks hand identical inputs to the same computation on
torch, ONNX Runtime and TensorRT. The VAE always runs in fp32 (the fp16 SDXL VAE overflows).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from maskattn_deploy.errors import UserError
from maskattn_deploy.export.adapters import as_outputs
from maskattn_deploy.export.component_spec import (
    FLOAT32,
    INT64,
    ComponentSpec,
    ModelDims,
    TensorSpec,
    component_spec,
    runtime_outputs,
    spec_template,
)
from maskattn_deploy.runtime.base import Backend, ComponentRunner, Feed, as_tensor

log = logging.getLogger(__name__)


class TorchComponentRunner(ComponentRunner):
    """Runs one diffusers / transformers module with the export's I/O contract."""

    def __init__(
        self,
        component: str,
        module: torch.nn.Module,
        device: torch.device,
        dtype: torch.dtype = torch.float32,
        spec: ComponentSpec | None = None,
    ) -> None:
        """``spec``: the component's spec with the model's widths (:func:`component_spec`);
        needed for the text encoders, whose outputs depend on the model's depth."""
        self.spec = spec or spec_template(component)
        if any(t.per_state for t in self.spec.outputs):
            raise UserError(
                f"the {component} runner needs spec=component_spec({component!r}, "
                "ModelDims.from_pipe(pipe)): its outputs depend on the model's depth"
            )
        super().__init__(component, runtime_outputs(component, self.spec.output_names))
        self.module = module
        self.adapter = self.spec.adapter(module)  # the module the exporter traces
        self.device = device
        self.dtype = torch.float32 if component.startswith("vae") else dtype

    def _activate(self) -> None:
        param = next(self.module.parameters())
        if param.device != self.device or param.dtype != self.dtype:
            self.module.to(device=self.device, dtype=self.dtype)
        self.module.eval()

    def _deactivate(self) -> None:
        pass  # the weights belong to the caller's pipeline; nothing to free

    def describe(self) -> str:
        return f"torch {str(self.dtype).removeprefix('torch.')} on {self.device}"

    def _cast(self, value: Any, tensor: TensorSpec) -> torch.Tensor:
        """A feed value as the adapter takes it: int64 ids, fp32 where the spec fixes fp32
        (timestep, time_ids), the runner's dtype for the other floats."""
        if tensor.dtype == INT64:
            dtype = torch.long
        elif tensor.dtype == FLOAT32:
            dtype = torch.float32
        else:
            dtype = self.dtype
        return as_tensor(value).to(self.device, dtype)

    def _infer(self, feed: Feed) -> dict[str, torch.Tensor]:
        args = [self._cast(feed[t.name], t) for t in self.spec.inputs]
        with torch.inference_mode():
            outputs = as_outputs(self.spec.output_names, self.adapter(*args))
        return {name: outputs[name] for name in self.output_names}


class TorchBackend(Backend):
    """A diffusers SDXL pipeline as a backend; ``gates`` is the installed GateSet or None."""

    def __init__(
        self,
        pipe: Any,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        from maskattn_deploy.gating import installed_gates

        device = torch.device(device)
        modules = {
            "text_encoder": pipe.text_encoder,
            "text_encoder_2": pipe.text_encoder_2,
            "unet": pipe.unet,
            "vae_decoder": pipe.vae,
        }
        dims = ModelDims.from_pipe(pipe)
        runners = {
            name: TorchComponentRunner(name, module, device, dtype, component_spec(name, dims))
            for name, module in modules.items()
        }
        super().__init__("torch", runners, device)
        self.pipe = pipe
        self.gates = installed_gates(pipe.unet)


def torch_backend(
    pipe: Any, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> TorchBackend:
    """The torch backend for a loaded diffusers pipeline (install gates on ``pipe.unet`` first)."""
    return TorchBackend(pipe, device, dtype)
