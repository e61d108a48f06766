"""The ``torch`` backend: diffusers modules (gate processors installed) behind the component contract.

It is the reference every other backend is compared with. Each runner takes the exact feed an
exported component takes (same names, shapes and meaning, see
:mod:`maskattn_deploy.export.component_spec`) and runs the spec's module adapter, the very
module the exporter traces, so parity checks hand identical inputs to the same computation on
torch, ONNX Runtime and TensorRT. The VAE always runs in fp32 (the fp16 SDXL VAE overflows).

``compile_mode`` runs the UNet through ``torch.compile`` (``default``: inductor's kernels;
``reduce-overhead``: the same plus CUDA graphs on CUDA). The first UNet call compiles; its
duration is kept as :attr:`TorchComponentRunner.warmup_s` so the caller can print it. Later
calls with the same shapes reuse the compiled graph.
"""

from __future__ import annotations

import contextlib
import logging
import time
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

COMPILE_MODES: tuple[str, ...] = ("default", "reduce-overhead")
# Components that torch.compile wraps when a compile mode is given.
COMPILED_COMPONENTS = ("unet",)


def check_compile_mode(mode: str | None) -> str | None:
    """Return ``mode`` (None: eager) or raise a one-line error naming the choices."""
    if mode is not None and mode not in COMPILE_MODES:
        raise UserError(f"unknown compile mode {mode!r}; choose {', '.join(COMPILE_MODES)}")
    return mode


class TorchComponentRunner(ComponentRunner):
    """Runs one diffusers / transformers module with the export's I/O contract."""

    def __init__(
        self,
        component: str,
        module: torch.nn.Module,
        device: torch.device,
        dtype: torch.dtype = torch.float32,
        spec: ComponentSpec | None = None,
        compile_mode: str | None = None,
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
        self.compile_mode = check_compile_mode(compile_mode)
        self.compile_backend = "inductor"  # torch.compile backend (TorchBackend sets it)
        self._call: Any = self.adapter
        self.warmup_s: float | None = None  # duration of the first compiled call

    def _activate(self) -> None:
        param = next(self.module.parameters())
        if param.device != self.device or param.dtype != self.dtype:
            self.module.to(device=self.device, dtype=self.dtype)
        self.module.eval()
        if self.compile_mode is not None and self._call is self.adapter:
            mode = None if self.compile_mode == "default" else self.compile_mode
            self._call = torch.compile(
                self.adapter, mode=mode, dynamic=False, backend=self.compile_backend
            )

    def _deactivate(self) -> None:
        pass  # the weights belong to the caller's pipeline; nothing to free

    def describe(self) -> str:
        compiled = f", torch.compile {self.compile_mode}" if self.compile_mode else ""
        return f"torch {str(self.dtype).removeprefix('torch.')} on {self.device}{compiled}"

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
            call = self.adapter if self.compile_mode is None else self._compiled_call
            outputs = as_outputs(self.spec.output_names, call(*args))
        outputs = {name: outputs[name] for name in self.output_names}
        if self.compile_mode == "reduce-overhead":  # the next replay reuses the graph's buffers
            outputs = {name: value.clone() for name, value in outputs.items()}
        return outputs

    def _compiled_call(self, *args: torch.Tensor) -> Any:
        """One call of the compiled module; the first one (the compile) is timed and its
        failure becomes a one-line error."""
        if self.compile_mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()
        if self.warmup_s is not None:
            return self._call(*args)
        start = time.perf_counter()
        try:
            out = self._call(*args)
        except Exception as exc:  # dynamo / inductor raise many error types
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise UserError(
                f"torch.compile ({self.compile_mode}) of the {self.component} failed on "
                f"{self.device}: {first[:300]}; run without --compile"
            ) from exc
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.warmup_s = time.perf_counter() - start
        log.info("torch.compile %s: first %s call %.1f s", self.compile_mode, self.component,
                 self.warmup_s)  # fmt: skip
        return out


class TorchBackend(Backend):
    """A diffusers SDXL pipeline as a backend; ``gates`` is the installed GateSet or None."""

    def __init__(
        self,
        pipe: Any,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        compile_mode: str | None = None,
        compile_backend: Any = "inductor",
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
            name: TorchComponentRunner(
                name, module, device, dtype, component_spec(name, dims),
                compile_mode if name in COMPILED_COMPONENTS else None,
            )
            for name, module in modules.items()
        }  # fmt: skip
        for runner in runners.values():
            runner.compile_backend = compile_backend
        super().__init__("torch", runners, device)
        self.pipe = pipe
        self.gates = installed_gates(pipe.unet)

    def compile_warmups(self) -> dict[str, float]:
        """Seconds of each compiled component's first call (its compile), once it has run."""
        return {
            name: runner.warmup_s
            for name, runner in self.runners.items()
            if isinstance(runner, TorchComponentRunner) and runner.warmup_s is not None
        }

    def recording(self) -> contextlib.AbstractContextManager[dict[str, list[torch.Tensor]]]:
        """Record each gated layer's open mask ``[rows, n, t]`` per UNet evaluation."""
        if self.gates is None:
            raise UserError(
                "masks can only be recorded with gates installed (drop --no-gates, or "
                "record them with a torch reference pass)"
            )
        return self.gates.recording()

    def stage_of(self, layer: str) -> str:
        """Stage (high / mid / low) of a gated layer."""
        return self.gates.stage_of(layer) if self.gates is not None else "mid"


def torch_backend(
    pipe: Any,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    compile_mode: str | None = None,
    compile_backend: Any = "inductor",
) -> TorchBackend:
    """The torch backend for a loaded diffusers pipeline (install gates on ``pipe.unet`` first).

    ``compile_mode`` (``default`` or ``reduce-overhead``) runs the UNet through torch.compile
    with ``compile_backend`` (inductor; another torch.compile backend such as ``aot_eager``
    traces the same graph without generating kernels).
    """
    return TorchBackend(pipe, device, dtype, compile_mode, compile_backend)
