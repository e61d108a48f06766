"""The ``tensorrt`` backend: engines in ``EXPORT_DIR/engines`` through :class:`TrtRunner`.

Each engine may hold several optimization profiles (one per recipe profile, e.g. a static
256x256 profile and a dynamic range). A component deserializes its engine once and its
TrtRunner keeps one execution context per profile used; the first profile whose ranges contain
the feed's shapes is chosen. TrtRunner owns the device buffers (allocated once per shape set),
its CUDA stream (ordered against the caller's) and the optional CUDA-graph replay.

Components without an engine (for example when only the UNet was built) run through ONNX
Runtime on the same export, with a log line saying so. TensorRT is never imported before
:func:`require_tensorrt_and_gpu` has confirmed a GPU and the package (docs/design.md section 6.1).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from maskattn_deploy.errors import UserError
from maskattn_deploy.export.folder import ExportManifest
from maskattn_deploy.runtime.base import (
    PIPELINE_COMPONENTS,
    Backend,
    ComponentRunner,
    Feed,
    as_tensor,
)

log = logging.getLogger(__name__)


def profile_fits(profile: Mapping[str, Any], shapes: Mapping[str, Sequence[int]]) -> bool:
    """True when every fed shape lies inside the profile's [min, max] ranges."""
    ranges = profile.get("shapes", {})
    for name, shape in shapes.items():
        if name not in ranges:
            continue
        low, high = ranges[name]["min"], ranges[name]["max"]
        if len(low) != len(shape):
            return False
        if any(not lo <= s <= hi for lo, s, hi in zip(low, shape, high, strict=True)):
            return False
    return True


def choose_profile(
    profiles: Sequence[Mapping[str, Any]], shapes: Mapping[str, Sequence[int]]
) -> int:
    """Index of the first profile that fits ``shapes`` (a one-line error names the ranges)."""
    for index, profile in enumerate(profiles):
        if profile_fits(profile, shapes):
            return index
    if not profiles:
        return 0
    names = ", ".join(str(p.get("name", i)) for i, p in enumerate(profiles))
    wanted = ", ".join(f"{k} {list(v)}" for k, v in shapes.items())
    raise UserError(
        f"no engine profile ({names}) accepts {wanted}; rebuild with a recipe whose shapes "
        "cover this size (maskattn-deploy build --recipe ...)"
    )


class TrtComponentRunner(ComponentRunner):
    """One engine file, deserialized once; one execution context per optimization profile used."""

    def __init__(
        self,
        component: str,
        engine_path: Path,
        export_dir: Path,
        cuda_graph: bool = False,
    ) -> None:
        super().__init__(component)
        self.engine_path = engine_path
        self.export_dir = export_dir
        self.cuda_graph = cuda_graph
        self._profiles: list[dict[str, Any]] = []
        self._runner: Any = None

    def describe(self) -> str:
        graph = " + CUDA graph" if self.cuda_graph else ""
        return f"tensorrt {self.engine_path.name}{graph}"

    def _activate(self) -> None:
        from maskattn_deploy.engine.cuda_check import require_tensorrt_and_gpu
        from maskattn_deploy.engine.runner import TrtRunner

        require_tensorrt_and_gpu()
        runner = TrtRunner(
            self.engine_path,
            export_dir=self.export_dir,
            cuda_graph=self.cuda_graph and self.component == "unet",
        )
        self._runner = runner.activate()  # load and check now, not in the first step
        manifest = self._runner.manifest
        self._profiles = list(manifest.profiles) if manifest is not None else []

    def _deactivate(self) -> None:
        if self._runner is not None:
            self._runner.deactivate()
        self._runner = None

    def _infer(self, feed: Feed) -> dict[str, torch.Tensor]:
        # TrtRunner copies each input into its own device buffer with the engine's dtype
        # (Tensor.copy_ casts), so fp32 host latents feed an fp16 engine without extra work.
        tensors = {name: as_tensor(value) for name, value in feed.items()}
        index = choose_profile(self._profiles, {k: tuple(v.shape) for k, v in tensors.items()})
        return self._runner.run(tensors, profile=index)


def engine_path(export_dir: Path, component: str) -> Path:
    from maskattn_deploy.engine.manifest import ENGINE_SUFFIX
    from maskattn_deploy.export.spec import ENGINES_DIR

    return export_dir / ENGINES_DIR / f"{component}{ENGINE_SUFFIX}"


def trt_backend(
    export_dir: str | Path,
    manifest: ExportManifest,
    components: tuple[str, ...] = PIPELINE_COMPONENTS,
    cuda_graph: bool = False,
) -> Backend:
    """The tensorrt backend over ``export_dir``; raises a one-line error without TensorRT/GPU."""
    from maskattn_deploy.engine.cuda_check import require_tensorrt_and_gpu

    require_tensorrt_and_gpu()
    export_dir = Path(export_dir)
    if not engine_path(export_dir, "unet").is_file():
        raise UserError(
            f"{export_dir} has no TensorRT engines; build them with "
            f"maskattn-deploy build {export_dir}"
        )
    runners: dict[str, ComponentRunner] = {}
    fallback = [c for c in components if not engine_path(export_dir, c).is_file()]
    if fallback:
        from maskattn_deploy.runtime.ort_backend import ort_backend

        log.warning(
            "no TensorRT engine for %s: running them with ONNX Runtime", ", ".join(fallback)
        )
        runners.update(ort_backend(export_dir, manifest, "auto", tuple(fallback)).runners)
    for name in components:
        if name not in fallback:
            runners[name] = TrtComponentRunner(
                name, engine_path(export_dir, name), export_dir, cuda_graph
            )
    ordered = {name: runners[name] for name in components}
    return Backend("tensorrt", ordered, "cuda")
