"""Triton model repositories: the served pipeline as a Python-backend model (+ TensorRT plans).

Layout (what ``maskattn-deploy export-triton`` writes and ``serve`` starts from)::

    REPO/
      maskattn_sdxl/                 the pipeline: Python backend, dynamic batching
        config.pbtxt
        1/model.py                   imports maskattn_deploy.serve.triton_model
        1/export/                    the export folder (export-triton; serve points at it)
      maskattn_unet/                 only with engines: TensorRT plans the pipeline calls (BLS)
        config.pbtxt                 platform tensorrt_plan, I/O from the engine manifests
        1/model.plan
      maskattn_text_encoder/ maskattn_text_encoder_2/ maskattn_vae_decoder/   (same)

``config.pbtxt`` files are written from Triton's own ``ModelConfig`` protobuf (shipped with
tritonclient), so the text is what the server parses. The pipeline model reads its settings
from the config's ``parameters`` (export folder, runtime backend, threads, limits).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from maskattn_deploy._lazy import require
from maskattn_deploy.errors import UserError
from maskattn_deploy.serve.protocol import INPUTS, MODEL_NAME, OUTPUTS
from maskattn_deploy.utils import atomic_dir

log = logging.getLogger(__name__)

EXPORT_SUBDIR = "export"  # the export folder inside the pipeline model's version folder
COMPONENT_MODELS = {
    "text_encoder": "maskattn_text_encoder",
    "text_encoder_2": "maskattn_text_encoder_2",
    "unet": "maskattn_unet",
    "vae_decoder": "maskattn_vae_decoder",
}
MODEL_PY = '''"""Triton Python-backend entry point of the maskattn-deploy pipeline (generated file).

The implementation lives in the installed maskattn-deploy package
(pip install 'maskattn-deploy[serve]' in the server's Python environment).
"""

from maskattn_deploy.serve.triton_model import TritonPythonModel  # noqa: F401
'''
COMPONENT_PY = '''"""Triton Python-backend entry point of one maskattn-deploy component (generated file)."""

from maskattn_deploy.serve.component_model import TritonPythonModel  # noqa: F401
'''
_TRITON_DTYPES = {
    "float32": "TYPE_FP32",
    "float16": "TYPE_FP16",
    "int64": "TYPE_INT64",
    "int32": "TYPE_INT32",
    "bool": "TYPE_BOOL",
}


@dataclass
class ServeConfig:
    """How the pipeline model runs (written into its config.pbtxt parameters)."""

    backend: str = "onnxruntime"  # runtime backend inside the model: onnxruntime | torch | tensorrt
    max_batch: int = 4  # requests per dynamic batch
    max_queue_delay_ms: float = 10.0  # how long the batcher waits to fill a batch
    max_queue: int = 64  # queued requests beyond this are rejected at once (overloaded)
    instances: int = 1  # model instances (each one loads the pipeline)
    threads: int = 0  # CPU threads per instance (0: cores / instances)
    max_steps: int = 150
    default_steps: int = 0  # 0: the model's (8 for tiny, 30 otherwise)
    ort_provider: str = "auto"
    model: str | None = None  # torch backend: model spec (tiny, folder, hub id)
    gates: str | None = None  # torch backend: gate checkpoint
    no_gates: bool = False
    device: str | None = None
    warmup: bool = True  # run one small request at load so the first client is not slow
    component_models: dict[str, str] = field(default_factory=dict)  # BLS: component -> model
    control_dir: str = ""  # serve's drain folder (serve.drain); empty: Triton's own shutdown
    split_components: bool = False  # export-triton: each network its own ONNX Runtime model

    def parameters(self, export_dir: str) -> dict[str, str]:
        values: dict[str, Any] = {
            "export_dir": export_dir,
            "backend": self.backend,
            "threads": self.threads,
            "max_steps": self.max_steps,
            "default_steps": self.default_steps,
            "ort_provider": self.ort_provider,
            "model": self.model or "",
            "gates": self.gates or "",
            "no_gates": self.no_gates,
            "device": self.device or "",
            "warmup": self.warmup,
            "component_models": json.dumps(self.component_models, sort_keys=True),
            "control_dir": self.control_dir,
        }
        return {key: str(value) for key, value in values.items()}

    @classmethod
    def from_parameters(cls, params: Mapping[str, str]) -> tuple[ServeConfig, str]:
        """Inverse of :meth:`parameters`: (config, export_dir as written)."""

        def flag(key: str) -> bool:
            return params.get(key, "False") == "True"

        config = cls(
            backend=params.get("backend", "onnxruntime"),
            threads=int(params.get("threads", "0")),
            max_steps=int(params.get("max_steps", "150")),
            default_steps=int(params.get("default_steps", "0")),
            ort_provider=params.get("ort_provider", "auto"),
            model=params.get("model") or None,
            gates=params.get("gates") or None,
            no_gates=flag("no_gates"),
            device=params.get("device") or None,
            warmup=flag("warmup"),
            component_models=json.loads(params.get("component_models") or "{}"),
            control_dir=params.get("control_dir", ""),
        )
        return config, params.get("export_dir", "")


def _model_config() -> Any:
    return require("tritonclient.grpc.model_config_pb2", "writing Triton model configs")


def _text_format() -> Any:
    return require("google.protobuf.text_format", "writing Triton model configs")


def pipeline_config_text(config: ServeConfig, export_dir: str, gpu: bool) -> str:
    """``config.pbtxt`` of the pipeline model."""
    mc = _model_config()
    model = mc.ModelConfig(name=MODEL_NAME, backend="python", max_batch_size=config.max_batch)
    for name, (dtype, dims, required) in INPUTS.items():
        tensor = model.input.add(name=name, data_type=getattr(mc, dtype), optional=not required)
        tensor.dims.extend(dims)
    for name, (dtype, dims) in OUTPUTS.items():
        model.output.add(name=name, data_type=getattr(mc, dtype)).dims.extend(dims)
    batching = model.dynamic_batching
    batching.max_queue_delay_microseconds = int(config.max_queue_delay_ms * 1000)
    # A full queue rejects new requests at once ("Exceeds maximum queue size"): a burst larger
    # than the server can hold gets a clear error instead of waiting without bound.
    batching.default_queue_policy.max_queue_size = config.max_queue
    kind = mc.ModelInstanceGroup.KIND_GPU if gpu else mc.ModelInstanceGroup.KIND_CPU
    model.instance_group.add(count=config.instances, kind=kind)
    for key, value in config.parameters(export_dir).items():
        model.parameters[key].string_value = value
    return _text_format().MessageToString(model)


def write_repository(
    out: Path,
    export_dir: Path | None,
    config: ServeConfig,
    copy_export: bool,
    say: Callable[[str], None] = log.info,
) -> Path:
    """Write a model repository into ``out`` (atomically; an existing ``out`` is refused).

    ``copy_export`` puts the export folder inside the repository (hard links where the file
    system allows, else copies) so the repository is self-contained, as NVIDIA's container
    needs it; otherwise the pipeline model points at ``export_dir`` where it is.
    """
    out = Path(out)
    if out.exists():
        raise UserError(f"{out} already exists; pass a new folder for the model repository")
    engines = _engine_components(export_dir, config) if copy_export else []
    split = _split_components(export_dir, config) if copy_export else []
    if engines or split:
        config.component_models = {c: COMPONENT_MODELS[c] for c in engines + split}
    with atomic_dir(out) as tmp:
        version = tmp / MODEL_NAME / "1"
        version.mkdir(parents=True)
        (version / "model.py").write_text(MODEL_PY)
        where = ""
        if export_dir is not None:
            where = str(Path(export_dir).resolve())
            if copy_export:
                _link_tree(Path(export_dir), version / EXPORT_SUBDIR)
                where = EXPORT_SUBDIR  # relative: resolved against the model folder at load
        gpu = config.backend == "tensorrt" or (config.device or "").startswith("cuda")
        text = pipeline_config_text(config, where, gpu)
        (tmp / MODEL_NAME / "config.pbtxt").write_text(text)
        for component in engines:
            _write_plan_model(tmp, Path(export_dir), component)  # type: ignore[arg-type]
        for component in split:
            _write_onnx_model(tmp, Path(export_dir), component, config)  # type: ignore[arg-type]
    say(f"wrote the model repository {out} ({', '.join(model_names(out))})")
    return out


def model_names(repository: Path) -> list[str]:
    return sorted(p.parent.name for p in Path(repository).glob("*/config.pbtxt"))


def _engine_components(export_dir: Path | None, config: ServeConfig) -> list[str]:
    """Components served as TensorRT plans (tensorrt backend with engines in the export)."""
    if config.backend != "tensorrt" or export_dir is None:
        return []
    from maskattn_deploy.engine.manifest import ENGINE_SUFFIX
    from maskattn_deploy.export.spec import ENGINES_DIR

    folder = Path(export_dir) / ENGINES_DIR
    found = [c for c in COMPONENT_MODELS if (folder / f"{c}{ENGINE_SUFFIX}").is_file()]
    if not found:
        raise UserError(
            f"{export_dir} has no TensorRT engines; build them with maskattn-deploy build "
            f"{export_dir}, or pass --backend onnxruntime"
        )
    return found


def _split_components(export_dir: Path | None, config: ServeConfig) -> list[str]:
    """Components served as models of their own on ONNX Runtime (``split_components``)."""
    if not config.split_components or export_dir is None:
        return []
    if config.backend != "onnxruntime":
        raise UserError(
            "--split-components serves the ONNX files; use it with --backend onnxruntime"
        )
    from maskattn_deploy.export.folder import ExportFolder

    known = ExportFolder.open(export_dir).manifest.components
    return [c for c in COMPONENT_MODELS if c in known]


def _write_onnx_model(repo: Path, export_dir: Path, component: str, config: ServeConfig) -> None:
    """A Python-backend model running one component's ONNX file (serve.component_model)."""
    from maskattn_deploy.export.folder import ExportFolder

    entry = ExportFolder.open(export_dir).manifest.components[component].to_dict()
    name = COMPONENT_MODELS[component]
    folder = repo / name / "1"
    folder.mkdir(parents=True)
    source = export_dir / entry.get("path", f"{component}/model.onnx")
    for item in source.parent.iterdir():
        if item.name.startswith(source.name):  # model.onnx and its external data
            _link_or_copy(str(item), str(folder / item.name.replace(source.name, "model.onnx", 1)))
    (folder / "model.py").write_text(COMPONENT_PY)
    mc = _model_config()
    model = mc.ModelConfig(name=name, backend="python", max_batch_size=0)
    for tensor in entry.get("inputs") or []:
        dims = [d if isinstance(d, int) else -1 for d in tensor["shape"]]
        model.input.add(name=tensor["name"], data_type=_dtype(tensor, name)).dims.extend(dims)
    for tensor in _runtime_output_specs(component, entry):
        dims = [d if isinstance(d, int) else -1 for d in tensor["shape"]]
        model.output.add(name=tensor["name"], data_type=_dtype(tensor, name)).dims.extend(dims)
    model.instance_group.add(count=1, kind=mc.ModelInstanceGroup.KIND_CPU)
    for key, value in {
        "component": component,
        "outputs": json.dumps([t["name"] for t in _runtime_output_specs(component, entry)]),
        "threads": str(config.threads),
        "ort_provider": config.ort_provider,
    }.items():
        model.parameters[key].string_value = value
    (repo / name / "config.pbtxt").write_text(_text_format().MessageToString(model))


def _runtime_output_specs(component: str, entry: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The exported outputs the pipeline reads (text encoders: not Optimum's extra states)."""
    from maskattn_deploy.export.component_spec import runtime_outputs

    outputs = entry.get("outputs") or []
    keep = set(runtime_outputs(component, [t["name"] for t in outputs]))
    return [t for t in outputs if t["name"] in keep]


def _link_tree(source: Path, target: Path) -> None:
    """Copy ``source`` to ``target`` without its engines folder, by hard links where the file
    system allows (else copies). The ONNX files stay even for components served as other
    models: the export folder is only complete with them (and they are hard links)."""
    source = Path(source)

    def ignore(folder: str, names: list[str]) -> list[str]:
        return [name for name in names if Path(folder) == source and name == "engines"]

    shutil.copytree(source, target, ignore=ignore, copy_function=_link_or_copy)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _write_plan_model(repo: Path, export_dir: Path, component: str) -> None:
    """A ``tensorrt_plan`` model for one engine, its config checked against the manifests."""
    from maskattn_deploy.engine.manifest import ENGINE_SUFFIX, read_engine_manifest
    from maskattn_deploy.export.folder import ExportFolder
    from maskattn_deploy.export.spec import ENGINES_DIR

    engine = export_dir / ENGINES_DIR / f"{component}{ENGINE_SUFFIX}"
    name = COMPONENT_MODELS[component]
    folder = repo / name / "1"
    folder.mkdir(parents=True)
    _link_or_copy(str(engine), str(folder / "model.plan"))
    record = ExportFolder.open(export_dir).manifest.components.get(component)
    if record is None:
        raise UserError(f"{export_dir}/manifest.json has no {component} component; re-export")
    entry = record.to_dict()
    from maskattn_deploy.export.component_spec import engine_outputs

    outputs = entry.get("outputs") or []
    marked = engine_outputs(component, [t["name"] for t in outputs])  # None: all of them
    if marked is not None:
        entry = {**entry, "outputs": [t for t in outputs if t["name"] in marked]}
    text = plan_config_text(name, entry, read_engine_manifest(engine).profiles)
    (repo / name / "config.pbtxt").write_text(text)


def plan_config_text(
    name: str, component: Mapping[str, Any], profiles: list[Mapping[str, Any]]
) -> str:
    """``config.pbtxt`` of a TensorRT plan from the export and engine manifests.

    Names and dtypes come from the export manifest's component I/O; a dim is -1 where the
    engine's profiles let it vary (else its fixed size). Every profile is listed, so Triton
    picks the one that fits each request's shapes.
    """
    inputs = component.get("inputs") or []
    outputs = component.get("outputs") or []
    profiles = list(profiles)
    check_plan_io(name, inputs, profiles)
    mc = _model_config()
    model = mc.ModelConfig(name=name, platform="tensorrt_plan", max_batch_size=0)
    for tensor in inputs:
        dims = _dims(tensor, profiles)
        model.input.add(name=tensor["name"], data_type=_dtype(tensor, name)).dims.extend(dims)
    for tensor in outputs:
        dims = [d if isinstance(d, int) else -1 for d in tensor["shape"]]
        model.output.add(name=tensor["name"], data_type=_dtype(tensor, name)).dims.extend(dims)
    group = model.instance_group.add(count=1, kind=mc.ModelInstanceGroup.KIND_GPU)
    group.profile.extend(str(i) for i in range(len(profiles)))
    return _text_format().MessageToString(model)


def check_plan_io(
    name: str, inputs: list[Mapping[str, Any]], profiles: list[Mapping[str, Any]]
) -> None:
    """Refuse an engine whose profiles do not cover exactly the export's inputs and ranks."""
    if not profiles:
        raise UserError(f"{name}: the engine manifest lists no optimization profiles; rebuild it")
    wanted = {t["name"]: len(t["shape"]) for t in inputs}
    for index, profile in enumerate(profiles):
        shapes = profile.get("shapes", {})
        if set(shapes) != set(wanted):
            raise UserError(
                f"{name}: engine profile {index} covers inputs {sorted(shapes)}, but the export "
                f"has {sorted(wanted)}; rebuild the engines from this export"
            )
        for tensor, rank in wanted.items():
            ranges = shapes[tensor]
            if any(len(ranges[k]) != rank for k in ("min", "opt", "max")):
                raise UserError(
                    f"{name}: engine profile {index} gives {tensor} a rank other than {rank}; "
                    "rebuild the engines from this export"
                )


def _dims(tensor: Mapping[str, Any], profiles: list[Mapping[str, Any]]) -> list[int]:
    """-1 where any profile's min and max differ (or the export's dim is symbolic)."""
    dims = []
    for axis, dim in enumerate(tensor["shape"]):
        sizes = {
            p["shapes"][tensor["name"]][k][axis] for p in profiles for k in ("min", "opt", "max")
        }
        fixed = isinstance(dim, int) and sizes == {dim}
        dims.append(dim if fixed else -1)
    return dims


def _dtype(tensor: Mapping[str, Any], model: str) -> int:
    dtype = str(tensor.get("dtype", "float32"))
    if dtype not in _TRITON_DTYPES:
        raise UserError(f"{model}: tensor {tensor.get('name')} has unsupported dtype {dtype}")
    return getattr(_model_config(), _TRITON_DTYPES[dtype])
