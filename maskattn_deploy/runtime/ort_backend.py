"""The ``onnxruntime`` backend: the export folder's ONNX files through ONNX Runtime.

Providers: ``cpu`` (CPUExecutionProvider, the default on machines without onnxruntime-gpu),
``cuda`` (CUDAExecutionProvider; with a CUDA build of torch, inputs and outputs are bound to
torch CUDA tensors through IO binding so no step round-trips through host memory) and
``tensorrt`` (TensorrtExecutionProvider first, CUDA and CPU as fallbacks). ``auto`` picks
``cuda`` when onnxruntime-gpu sees a GPU, else ``cpu``.

The masked-softmax node carries a model-local ONNX function with its standard-op
decomposition, which ONNX Runtime inlines: no custom-op library is needed.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from maskattn_deploy._lazy import require
from maskattn_deploy.errors import BackendUnavailableError, UserError
from maskattn_deploy.export.component_spec import runtime_outputs
from maskattn_deploy.export.folder import ExportManifest
from maskattn_deploy.export.spec import LATENT_FACTOR
from maskattn_deploy.runtime.base import (
    PIPELINE_COMPONENTS,
    Backend,
    ComponentRunner,
    Feed,
    as_numpy,
    as_tensor,
)

log = logging.getLogger(__name__)

PROVIDERS: tuple[str, ...] = ("auto", "cpu", "cuda", "tensorrt")
_ORT_PROVIDER = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}
_NP_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(bool)": np.bool_,
}


def resolve_provider(provider: str) -> str:
    """Map ``auto`` to ``cuda`` or ``cpu``; refuse a provider this onnxruntime build lacks."""
    if provider not in PROVIDERS:
        raise UserError(
            f"unknown ONNX Runtime provider {provider!r}; choose {', '.join(PROVIDERS)}"
        )
    ort = require("onnxruntime", "the onnxruntime backend")
    available = set(ort.get_available_providers())
    if provider == "auto":
        return "cuda" if "CUDAExecutionProvider" in available else "cpu"
    wanted = _ORT_PROVIDER[provider][0]
    if wanted not in available:
        raise BackendUnavailableError(
            f"this onnxruntime build has no {wanted} (it has {', '.join(sorted(available))}): "
            "pip uninstall onnxruntime && pip install onnxruntime-gpu on a machine with an NVIDIA GPU"
        )
    return provider


class OrtComponentRunner(ComponentRunner):
    """One ``InferenceSession``; feeds are cast to the dtypes the graph declares."""

    def __init__(
        self,
        component: str,
        onnx_path: str | Path,
        provider: str = "cpu",
        threads: int | None = None,
        io_binding: bool | None = None,
        outputs: tuple[str, ...] | None = None,
        gate_outputs: bool = False,
    ) -> None:
        super().__init__(component, outputs)
        self.onnx_path = Path(onnx_path)
        # Gate recording (runtime.ort_gates): the session also exposes each gated layer's
        # gate logits; while ``records`` is set, every run appends the open masks.
        self.gate_outputs = gate_outputs
        self.gates: list[Any] = []
        self.records: dict[str, list[torch.Tensor]] | None = None
        self._gate_tmp: Path | None = None
        self.provider = provider
        self.threads = threads
        # IO binding needs torch CUDA tensors to bind; without them CUDA runs via host copies.
        self.io_binding = (
            provider != "cpu" and torch.cuda.is_available() if io_binding is None else io_binding
        )
        self.session: Any = None
        self._in_types: dict[str, Any] = {}
        self._out_types: dict[str, Any] = {}
        self._out_shapes: dict[str, list[Any]] = {}
        self._in_shapes: dict[str, list[Any]] = {}

    def describe(self) -> str:
        binding = " + IO binding" if self.io_binding else ""
        if self.session is None:
            return f"onnxruntime {self.provider}{binding}"
        used = self.session.get_providers()[0].removesuffix("ExecutionProvider")
        return f"onnxruntime {used}{binding}"

    def _activate(self) -> None:
        ort = require("onnxruntime", "the onnxruntime backend")
        if not self.onnx_path.is_file():
            raise UserError(f"{self.onnx_path} is missing; re-run maskattn-deploy export")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        if self.threads:
            options.intra_op_num_threads = self.threads
        source: Any = str(self.onnx_path)
        if self.gate_outputs:
            from maskattn_deploy.runtime.ort_gates import with_gate_outputs

            source, self.gates, self._gate_tmp = with_gate_outputs(self.onnx_path)
        try:
            self.session = ort.InferenceSession(
                source, options, providers=_ORT_PROVIDER[self.provider]
            )
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph types
            raise UserError(
                f"ONNX Runtime cannot load {self.onnx_path}: {str(exc).splitlines()[0]}; "
                "re-run maskattn-deploy export"
            ) from exc
        self._in_types = {i.name: _NP_DTYPES[i.type] for i in self.session.get_inputs()}
        self._in_shapes = {i.name: list(i.shape) for i in self.session.get_inputs()}
        self._out_shapes = {o.name: list(o.shape) for o in self.session.get_outputs()}
        self._out_types = {o.name: _NP_DTYPES[o.type] for o in self.session.get_outputs()}
        log.debug("%s: %s", self.component, self.describe())

    def _deactivate(self) -> None:
        self.session = None
        if self._gate_tmp is not None:
            shutil.rmtree(self._gate_tmp, ignore_errors=True)
            self._gate_tmp = None

    def use_all_outputs(self) -> tuple[str, ...]:
        """Return every output the graph has from now on, not only the component's own.

        ``--per-layer`` exports add ``probs/<layer>`` outputs for parity's localisation.
        """
        self.activate()
        self.output_names = tuple(o.name for o in self.session.get_outputs())
        return self.output_names

    def _infer(self, feed: Feed) -> dict[str, torch.Tensor]:
        recording = self.records is not None and self.gates
        if self.io_binding and not recording:
            return self._infer_bound(feed)
        inputs = {name: as_numpy(value, self._in_types[name]) for name, value in feed.items()}
        names = list(self.output_names)
        extra = [gate.tensor for gate in self.gates] if recording else []
        outputs = self.session.run(names + extra, inputs)
        if recording:
            from maskattn_deploy.runtime.ort_gates import open_masks

            for gate, logits in zip(self.gates, outputs[len(names) :], strict=True):
                self.records[gate.layer].append(open_masks(logits, gate.threshold))
        own = outputs[: len(names)]
        return {name: torch.from_numpy(value) for name, value in zip(names, own, strict=True)}

    def _binding_device(self) -> torch.device:
        if self.provider == "cpu":
            return torch.device("cpu")
        return torch.device("cuda", torch.cuda.current_device())

    def _infer_bound(self, feed: Feed) -> dict[str, torch.Tensor]:
        """IO-binding path: inputs and outputs are torch buffers on the provider's device.

        On CUDA nothing crosses to the host; on CPU the same code runs (it is how CI covers it).
        """
        device = self._binding_device()
        kind, index = device.type, device.index or 0
        binding = self.session.io_binding()
        bound: dict[str, torch.Tensor] = {}  # must outlive run_with_iobinding
        for name, value in feed.items():
            np_type = self._in_types[name]
            tensor = as_tensor(value).to(device, _torch_dtype(np_type)).contiguous()
            bound[name] = tensor
            binding.bind_input(name, kind, index, np_type, list(tensor.shape), tensor.data_ptr())
        shapes = {name: tuple(t.shape) for name, t in bound.items()}
        outputs = {}
        for name in self.output_names:
            np_type, shape = self._out_types[name], self._output_shape(name, shapes)
            out = torch.empty(shape, dtype=_torch_dtype(np_type), device=device)
            binding.bind_output(name, kind, index, np_type, list(shape), out.data_ptr())
            outputs[name] = out
        if device.type == "cuda":
            # ORT runs on its own CUDA stream: make torch's pending writes to the inputs visible.
            torch.cuda.current_stream(device).synchronize()
        binding.synchronize_inputs()
        self.session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        return outputs

    def _output_shape(self, name: str, in_shapes: dict[str, tuple[int, ...]]) -> tuple[int, ...]:
        """Concrete output shape: static dims, or a symbol shared with an input, or the contract."""
        symbols: dict[str, int] = {}
        for input_name, dims in self._in_shapes.items():
            for dim, size in zip(dims, in_shapes[input_name], strict=True):
                if isinstance(dim, str):
                    symbols[dim] = size
        shape = []
        for axis, dim in enumerate(self._out_shapes[name]):
            if isinstance(dim, int):
                shape.append(dim)
            elif dim in symbols:
                shape.append(symbols[dim])
            else:
                shape.append(_contract_dim(self.component, axis, in_shapes))
        return tuple(shape)


def _torch_dtype(np_dtype: Any) -> torch.dtype:
    return torch.from_numpy(np.zeros(0, dtype=np_dtype)).dtype


def _contract_dim(component: str, axis: int, in_shapes: dict[str, tuple[int, ...]]) -> int:
    """An output dim from the component contract when the graph leaves it symbolic."""
    first = next(iter(in_shapes.values()))
    if component == "unet":
        return in_shapes["sample"][axis]
    if component == "vae_decoder":
        return first[axis] * LATENT_FACTOR if axis >= 2 else (first[0] if axis == 0 else 3)
    if axis < len(first):
        return first[axis]
    raise UserError(
        f"cannot infer output axis {axis} of {component} for IO binding; re-export with static widths"
    )


class OrtBackend(Backend):
    """ONNX Runtime runners; :meth:`recording` needs the UNet created with ``gate_outputs``."""

    def __init__(
        self, runners: dict[str, OrtComponentRunner], device: str, manifest: ExportManifest
    ) -> None:
        super().__init__("onnxruntime", runners, device)
        from maskattn_deploy.runtime.ort_gates import stage_namer

        stage = manifest.gates.config.get("stage") if manifest.gates is not None else None
        self.stage_of = stage_namer(list(manifest.gated_layers), stage)

    @contextlib.contextmanager
    def recording(self) -> Iterator[dict[str, list[torch.Tensor]]]:
        """Record each gated layer's open mask ``[rows, n, t]`` per UNet evaluation."""
        unet = self.runners.get("unet")
        if not isinstance(unet, OrtComponentRunner) or not unet.gate_outputs:
            raise UserError(
                "masks are recorded on ONNX Runtime only with ort_backend(..., gate_outputs=True)"
            )
        unet.activate()
        if not unet.gates:
            raise UserError(
                f"{unet.onnx_path} has no gated-layer custom nodes, so there are no gates to record"
            )
        records: dict[str, list[torch.Tensor]] = defaultdict(list)
        unet.records = records
        try:
            yield records
        finally:
            unet.records = None


def ort_backend(
    export_dir: str | Path,
    manifest: ExportManifest,
    provider: str = "auto",
    components: tuple[str, ...] = PIPELINE_COMPONENTS,
    threads: int | None = None,
    io_binding: bool | None = None,
    gate_outputs: bool = False,
) -> Backend:
    """An onnxruntime backend over ``export_dir`` (see :func:`resolve_provider` for providers).

    ``io_binding`` defaults to on for GPU providers when torch has CUDA; forcing it on with the
    CPU provider runs the binding code path on the host (used by the tests). ``gate_outputs``
    lets :meth:`OrtBackend.recording` record the gate masks (see
    :mod:`maskattn_deploy.runtime.ort_gates`).
    """
    provider = resolve_provider(provider)
    if provider != "cpu" and not torch.cuda.is_available() and io_binding is None:
        log.warning(
            "torch has no CUDA here, so ONNX Runtime %s runs without IO binding (host copies "
            "per call); install a CUDA build of torch to keep tensors on the GPU",
            provider,
        )
    known = manifest.components
    missing = [name for name in components if name not in known]
    if missing:
        raise UserError(
            f"{export_dir} has no {', '.join(missing)} component(s); re-run maskattn-deploy export"
        )
    runners = {
        name: OrtComponentRunner(
            name,
            Path(export_dir) / known[name].path,
            provider,
            threads,
            io_binding,
            runtime_outputs(name, [o["name"] for o in known[name].outputs]),
            gate_outputs=gate_outputs and name == "unet",
        )
        for name in components
    }
    device = "cuda" if provider != "cpu" and torch.cuda.is_available() else "cpu"
    return OrtBackend(runners, device, manifest)
