"""One exported network as its own Triton Python-backend model, on ONNX Runtime.

``export-triton --split-components`` serves every component (text encoders, UNet, VAE decoder)
as a model of its own, named like the TensorRT plans (``maskattn_unet`` ...), and the pipeline
model calls them over BLS exactly as it calls the plans. Each component then scales on its own
(``instance_group`` per model) and the BLS path runs on machines without TensorRT.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np


class TritonPythonModel:
    """Runs ``parameters.component`` from the ``model.onnx`` in its version folder."""

    def initialize(self, args: dict[str, str]) -> None:
        import triton_python_backend_utils as pb_utils

        from maskattn_deploy.runtime.ort_backend import OrtComponentRunner, resolve_provider

        self.pb = pb_utils
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        path = Path(args["model_repository"]) / args["model_version"] / "model.onnx"
        threads = int(params.get("threads") or 0) or None
        provider = resolve_provider(params.get("ort_provider") or "auto")
        outputs = tuple(json.loads(params.get("outputs") or "[]")) or None
        self.runner = OrtComponentRunner(
            params["component"], path, provider, threads, outputs=outputs
        ).activate()

    def execute(self, requests: list[Any]) -> list[Any]:
        pb = self.pb
        responses = []
        for request in requests:
            feed = {
                name: pb.get_input_tensor_by_name(request, name).as_numpy()
                for name in self.runner.input_names
            }
            try:
                outputs = self.runner.infer(feed)
            except Exception as exc:  # noqa: BLE001 - answer the request, keep serving
                error = pb.TritonError(f"{self.runner.component}: {exc}", pb.TritonError.INTERNAL)
                responses.append(pb.InferenceResponse(error=error))
                continue
            tensors = [
                pb.Tensor(name, np.ascontiguousarray(value.numpy()))
                for name, value in outputs.items()
            ]
            responses.append(pb.InferenceResponse(output_tensors=tensors))
        return responses

    def finalize(self) -> None:
        self.runner.deactivate()
