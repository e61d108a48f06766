"""The pipeline as a Triton Python-backend model (runs inside Triton's Python stub process).

Triton's dynamic batcher hands :meth:`TritonPythonModel.execute` up to ``max_batch_size``
requests at once. Each is validated on its own (a bad one gets its own INVALID_ARG error and
the others still run); the valid ones are grouped by
:func:`~maskattn_deploy.runtime.batching.plan_batches` (same size, steps, sampler, guidance
on/off, within the export's UNet batch) and each group runs through
:meth:`~maskattn_deploy.runtime.pipeline.Pipeline.generate_batch`: one UNet call per step for
the whole group. Every request gets exactly one response, in order.

The pipeline's settings come from the model config's ``parameters``
(:class:`~maskattn_deploy.serve.repository.ServeConfig`). With ``component_models`` set, the
networks run as other models of the same server (TensorRT plans) through BLS
(:mod:`maskattn_deploy.serve.bls`); otherwise in this process on the configured backend.
"""

from __future__ import annotations

import io
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from maskattn_deploy.errors import UserError
from maskattn_deploy.serve.protocol import (
    INPUTS,
    Limits,
    RequestError,
    field_message,
    parse_request,
)
from maskattn_deploy.serve.repository import ServeConfig

log = logging.getLogger("maskattn_deploy.serve")


class TritonPythonModel:
    """Triton's entry point: ``initialize`` loads the pipeline, ``execute`` serves batches."""

    def initialize(self, args: dict[str, str]) -> None:
        import triton_python_backend_utils as pb_utils

        self.pb = pb_utils
        model_config = json.loads(args["model_config"])
        params = {
            key: value.get("string_value", "")
            for key, value in (model_config.get("parameters") or {}).items()
        }
        config, export_dir = ServeConfig.from_parameters(params)
        model_dir = Path(args["model_repository"])
        if export_dir and not Path(export_dir).is_absolute():
            export_dir = str(model_dir / args["model_version"] / export_dir)
        instances = sum(int(g.get("count", 1)) for g in model_config.get("instance_group", []))
        threads = config.threads or max(1, (os.cpu_count() or 1) // max(instances, 1))
        device_id = args.get("model_instance_device_id", "0")
        from maskattn_deploy.serve.pipeline import serving_pipeline

        self.pipeline = serving_pipeline(config, export_dir or None, threads, device_id)
        self.limits = Limits(config.max_steps, self.pipeline.default_steps)
        self.outputs = [o["name"] for o in model_config.get("output", [])]
        if config.warmup and not config.component_models:  # BLS only works inside execute
            self._warmup()
        self.drain = None
        if config.control_dir:
            from maskattn_deploy.serve.drain import DrainWatch

            self.drain = DrainWatch(Path(config.control_dir))
        # Which installation the stub imported: the environment serve runs in, found on PATH.
        package = Path(__file__).resolve().parents[1]
        # Triton's logger: the stub's Python logging has no handler, so log.info is dropped.
        pb_utils.Logger.log_info(
            f"maskattn_sdxl ready: {self.pipeline.backend.describe()} ({package})"
        )

    def _warmup(self) -> None:
        """One small generation so the first client does not pay for session start-up."""
        from maskattn_deploy.runtime.pipeline import GenerateConfig

        info = self.pipeline.info
        height = info.height_range[0] if info.height_range else None
        width = info.width_range[0] if info.width_range else None
        config = GenerateConfig("warm-up", steps=1, height=height, width=width)
        self.pipeline.generate_batch([config], gate_stats=True)

    def execute(self, requests: list[Any]) -> list[Any]:
        if self.drain is None:
            return self._execute(requests)
        if self.drain.draining():
            from maskattn_deploy.serve.drain import SHUTTING_DOWN

            return [_error(self.pb, SHUTTING_DOWN, "UNAVAILABLE") for _ in requests]
        with self.drain.busy():
            return self._execute(requests)

    def _execute(self, requests: list[Any]) -> list[Any]:
        pb = self.pb
        responses: list[Any] = [None] * len(requests)
        valid: list[tuple[int, Any, bool]] = []
        for index, request in enumerate(requests):
            if request.is_cancelled():
                responses[index] = _error(pb, "the client cancelled the request", "CANCELLED")
                continue
            try:
                config, masks = self._parse(request)
            except UserError as exc:
                responses[index] = _error(pb, field_message(exc), "INVALID_ARG")
                continue
            valid.append((index, config, masks))
        from maskattn_deploy.runtime.batching import plan_batches

        configs = [config for _, config, _ in valid]
        for batch in plan_batches(configs, self.pipeline.max_rows):
            members = [valid[k] for k in batch]
            for (index, _, _), response in zip(members, self._run(members, requests), strict=True):
                responses[index] = response
        return responses

    def _parse(self, request: Any) -> tuple[Any, bool]:
        from maskattn_deploy.runtime.pipeline import GenerateConfig

        fields = {}
        for name in INPUTS:
            tensor = self.pb.get_input_tensor_by_name(request, name)
            if tensor is not None:
                fields[name] = tensor.as_numpy()
        kwargs, masks = parse_request(fields, self.limits)
        try:
            config = self.pipeline.resolve(GenerateConfig(**kwargs))
        except UserError as exc:
            raise RequestError(field_message(exc)) from None
        return config, masks

    def _run(self, members: list[tuple[int, Any, bool]], requests: list[Any]) -> list[Any]:
        """Generate one batch; each member gets its response (or the batch's error)."""
        pb = self.pb
        start = time.perf_counter()
        try:
            results = self.pipeline.generate_batch(
                [config for _, config, _ in members],
                gate_stats=self.pipeline.gate_stats,
                record_masks=self.pipeline.gate_stats and any(m for _, _, m in members),
            )
        except UserError as exc:
            return [_error(pb, field_message(exc), "INVALID_ARG") for _ in members]
        except Exception as exc:  # noqa: BLE001 - a failed batch must still answer every request
            log.exception("batch of %d failed", len(members))
            message = f"generation failed: {type(exc).__name__}: {exc}"
            return [_error(pb, message, "INTERNAL") for _ in members]
        seconds = time.perf_counter() - start
        return [
            self._response(requests[index], result, masks, seconds)
            for (index, _, masks), result in zip(members, results, strict=True)
        ]

    def _response(self, request: Any, result: Any, masks: bool, batch_s: float) -> Any:
        pb = self.pb
        wanted = set(request.requested_output_names()) or set(self.outputs)
        values = response_values(result, masks, wanted, batch_s)
        tensors = [pb.Tensor(name, value) for name, value in values.items()]
        return pb.InferenceResponse(output_tensors=tensors)

    def finalize(self) -> None:
        self.pipeline.backend.release()


def _error(pb: Any, message: str, code: str) -> Any:
    return pb.InferenceResponse(error=pb.TritonError(message, getattr(pb.TritonError, code)))


def response_values(result: Any, masks: bool, wanted: set[str], batch_s: float) -> dict[str, Any]:
    """Output arrays of one request (only those in ``wanted``; batch dimension of 1 added)."""
    from maskattn_deploy.runtime.outputs import png_info

    image = result.images[0]
    settings = {**result.settings, "image_index": 0}
    out: dict[str, Any] = {}
    if "IMAGE_PNG" in wanted:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", pnginfo=png_info(settings))
        out["IMAGE_PNG"] = np.array([[buffer.getvalue()]], dtype=np.object_)
    if "IMAGE" in wanted:
        out["IMAGE"] = np.asarray(image.convert("RGB"), dtype=np.uint8)[None]
    if "SETTINGS" in wanted:
        payload = {**settings, "warnings": result.warnings}
        out["SETTINGS"] = _json(payload)
    if "TIMINGS" in wanted:
        timings = {**result.timings.as_dict(), "batch_size": result.batch_size, "batch_s": batch_s}
        out["TIMINGS"] = _json(timings)
    gate_open = result.gate_open or {}
    if "GATE_LAYERS" in wanted:
        out["GATE_LAYERS"] = np.array([[k.encode() for k in gate_open]], dtype=np.object_)
    if "GATE_OPEN_FRACTION" in wanted:
        out["GATE_OPEN_FRACTION"] = np.array([list(gate_open.values())], dtype=np.float32)
    stages = sorted(result.masks) if masks and result.masks else []
    if "MASKS" in wanted:
        maps = [result.masks[s][0].numpy() for s in stages]
        out["MASKS"] = (
            np.stack(maps)[None].astype(np.float32)
            if maps
            else np.zeros((1, 0, 0, 0, 0), np.float32)
        )
    if "MASK_STAGES" in wanted:
        out["MASK_STAGES"] = np.array([[s.encode() for s in stages]], dtype=np.object_)
    if "TOKENS" in wanted:
        out["TOKENS"] = np.array([[t.encode() for t in result.token_labels]], dtype=np.object_)
    return out


def _json(data: dict[str, Any]) -> np.ndarray:
    return np.array([[json.dumps(data, sort_keys=True, default=str).encode()]], dtype=np.object_)
