"""The typed training configuration: a recipe file (TOML) plus ``key=value`` overrides.

A recipe has top-level ``model``/``name``/``description`` and the sections ``[data]``,
``[gates]``, ``[optim]``, ``[train]`` and ``[log]`` whose keys are the fields of the dataclasses
below. Every value can be overridden on the command line as ``section.key=value`` (or just
``key=value`` when the key name is unique); the value is parsed with the type of the field, and
an unknown key fails with the list of valid keys.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from maskattn_deploy.checks import check_float, check_int, is_number
from maskattn_deploy.errors import InvalidValueError, UserError

if typing.TYPE_CHECKING:
    from maskattn_deploy.gating.config import GateConfig

MIXED_PRECISION = ("auto", "no", "fp16", "bf16")
MAX_RESOLUTION = 4096  # pixels; SDXL trains at 1024
MAX_STEPS = 10**9
MAX_SEED = 2**40  # the run seeds torch with seed * 1_000_003 + rank (+ step), below 2**64
SCHEDULES = ("cosine", "constant", "linear")
CACHE_MODES = ("off", "latents", "text", "all")


@dataclass
class DataSection:
    """Where the images and captions come from and how they are prepared."""

    spec: str = "synthetic:256"  # see maskattn_deploy.train.data for the grammar
    resolution: int = 1024  # square training size in pixels
    multi_object_only: bool = False  # keep captions naming >= min_objects objects
    min_objects: int = 2
    caption_filter: str = "auto"  # auto | heuristic | spacy
    caption_dropout: float = 0.0  # probability of training on the empty caption
    limit: int = 0  # use only the first N records (0 = all)
    num_workers: int = 4  # image decoding threads
    cache: str = "off"  # off | latents | text | all: encode each image/caption once to disk
    cache_dir: str = ""  # default: OUT/cache


@dataclass
class GatesSection:
    """Gate placement (see maskattn_deploy.gating.GateConfig)."""

    stage: str = "mid"
    placement: str = "both"
    share_heads: bool = True
    hidden_dim: int = 128
    threshold: float = 0.0
    init: str = ""  # start from these gates (a checkpoint folder), e.g. the 512 px run's


@dataclass
class OptimSection:
    """AdamW and the learning-rate schedule."""

    lr: float = 1e-4
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    schedule: str = "cosine"  # cosine | constant | linear, after a linear warm-up
    warmup_steps: int = 1000
    min_lr_ratio: float = 0.0  # cosine/linear floor as a fraction of lr
    max_grad_norm: float = 1.0  # 0 disables clipping


@dataclass
class TrainSection:
    """Steps, batch, precision and seed."""

    steps: int = 100_000  # optimizer steps; the learning-rate schedule spans them
    batch_size: int = 2  # per process and micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step (ignored when effective_batch > 0)
    effective_batch: int = 0  # images per optimizer step over all processes; sets grad_accum
    seed: int = 0
    mixed_precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | no | fp16 | bf16
    gradient_checkpointing: bool = False  # recompute the frozen UNet's activations
    gate_estimator: str = "bias"  # bias (as the authors) | relaxed: see gating/modes.py Estimator
    allow_tf32: bool = True


@dataclass
class LogSection:
    """Feedback and checkpoints."""

    every: int = 20  # log loss, lr, open fractions, images/s every N steps
    eval_every: int = 0  # loss on a fixed batch every N steps (0 = only at start and end)
    eval_batch: int = 8
    checkpoint_every: int = 1000  # training-state checkpoints (0 = only at the end)
    keep_checkpoints: int = 3
    tensorboard: bool = True  # when tensorboard is installed
    progress: bool = True


@dataclass
class TrainConfig:
    """Everything that defines a training run."""

    name: str = "custom"
    description: str = ""
    model: str = "tiny"
    data: DataSection = field(default_factory=DataSection)
    gates: GatesSection = field(default_factory=GatesSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    log: LogSection = field(default_factory=LogSection)

    def grad_accum_for(self, world: int = 1) -> int:
        """Micro-batches per optimizer step with ``world`` processes.

        With ``train.effective_batch`` set, the same recipe keeps the paper's batch on any number
        of GPUs: grad_accum = effective_batch / (batch_size x world), which must divide exactly.
        """
        t = self.train
        if t.effective_batch <= 0:
            return t.grad_accum
        per_step = t.batch_size * world
        if t.effective_batch % per_step:
            raise UserError(
                f"train.effective_batch={t.effective_batch} is not a multiple of batch_size x "
                f"processes = {t.batch_size} x {world}; change train.batch_size or the process count"
            )
        return t.effective_batch // per_step

    def gate_config(self) -> GateConfig:
        from maskattn_deploy.gating.config import GateConfig

        g = self.gates
        return GateConfig(
            stage=g.stage,  # type: ignore[arg-type]
            placement=g.placement,  # type: ignore[arg-type]
            share_heads=g.share_heads,
            hidden_dim=g.hidden_dim,
            threshold=g.threshold,
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> TrainConfig:
        """Check ranges and choices; raise a UserError naming the bad key and its range."""
        from maskattn_deploy.gating.config import PLACEMENTS, STAGES
        from maskattn_deploy.gating.modes import ESTIMATORS

        d, g, o, t, lg = self.data, self.gates, self.optim, self.train, self.log
        check_int("data.resolution", d.resolution, 8, MAX_RESOLUTION)
        if d.resolution % 8:
            raise InvalidValueError(f"data.resolution must be a multiple of 8, got {d.resolution}")
        check_int("data.min_objects", d.min_objects, 0)
        check_float("data.caption_dropout", d.caption_dropout, 0.0, 1.0)
        check_int("data.limit", d.limit, 0)
        check_int("data.num_workers", d.num_workers, 0, 256)
        check_int("gates.hidden_dim", g.hidden_dim, 1, 65536)
        if not is_number(g.threshold) or math.isnan(g.threshold):
            raise InvalidValueError(f"gates.threshold must be a number, got {g.threshold!r}")
        check_float("optim.lr", o.lr, above=0.0)
        check_float("optim.weight_decay", o.weight_decay, 0.0)
        if len(o.betas) != 2:
            raise UserError("optim.betas needs two values, e.g. optim.betas=0.9,0.999")
        for i, beta in enumerate(o.betas):
            check_float(f"optim.betas[{i}]", beta, 0.0, below=1.0)
        check_float("optim.eps", o.eps, above=0.0)
        check_int("optim.warmup_steps", o.warmup_steps, 0)
        check_float("optim.min_lr_ratio", o.min_lr_ratio, 0.0, 1.0)
        check_float("optim.max_grad_norm", o.max_grad_norm, 0.0)
        check_int("train.steps", t.steps, 1, MAX_STEPS)
        check_int("train.batch_size", t.batch_size, 1)
        check_int("train.grad_accum", t.grad_accum, 1)
        check_int("train.effective_batch", t.effective_batch, 0, hint=" (0 = unused)")
        check_int("train.seed", t.seed, 0, MAX_SEED)
        check_int("log.every", lg.every, 1)
        check_int("log.eval_every", lg.eval_every, 0, hint=" (0 = only at start and end)")
        check_int("log.eval_batch", lg.eval_batch, 1)
        check_int("log.checkpoint_every", lg.checkpoint_every, 0, hint=" (0 = only at the end)")
        check_int("log.keep_checkpoints", lg.keep_checkpoints, 1)
        choices = [
            ("data.cache", d.cache, CACHE_MODES),
            ("gates.stage", g.stage, STAGES),
            ("gates.placement", g.placement, PLACEMENTS),
            ("optim.schedule", o.schedule, SCHEDULES),
            ("train.mixed_precision", t.mixed_precision, MIXED_PRECISION),
            ("train.gate_estimator", t.gate_estimator, ESTIMATORS),
        ]
        for name, value, allowed in choices:
            if value not in allowed:
                raise UserError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
        return self


SECTIONS: tuple[str, ...] = ("data", "gates", "optim", "train", "log")
TOP_LEVEL: tuple[str, ...] = ("name", "description", "model")


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def valid_keys() -> list[str]:
    """Every overridable key, as ``section.key`` (top-level keys bare)."""
    keys = list(TOP_LEVEL)
    for section in SECTIONS:
        cls = _field_types(TrainConfig)[section]
        keys += [f"{section}.{name}" for name in _field_types(cls)]
    return keys


def resolve_key(key: str) -> str:
    """Map ``key`` (``section.key`` or a unique bare key) to its full name, or fail clearly."""
    keys = valid_keys()
    if key in keys:
        return key
    matches = [k for k in keys if k.rsplit(".", 1)[-1] == key]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise UserError(f"key {key!r} is ambiguous: write one of {', '.join(matches)}")
    raise UserError(f"unknown training setting {key!r}; valid keys: {', '.join(keys)}")


def _type_of(full_key: str) -> Any:
    section, _, name = full_key.rpartition(".")
    if not section:
        return _field_types(TrainConfig)[name]
    return _field_types(_field_types(TrainConfig)[section])[name]


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def parse_value(full_key: str, text: str) -> Any:
    """Parse a command-line string with the type of ``full_key``'s field."""
    kind = _type_of(full_key)
    try:
        if kind is bool:
            if text.lower() in _TRUE | _FALSE:
                return text.lower() in _TRUE
            raise ValueError("expected true or false")
        if kind is int:
            value = float(text)  # accepts 1e3 / 100_000 style
            if value != int(value):
                raise ValueError("expected an integer")
            return int(value)
        if kind is float:
            return float(text)
        if typing.get_origin(kind) is list:
            items = json.loads(text) if text.strip().startswith("[") else text.split(",")
            return [float(item) for item in items]
        return text
    except ValueError as exc:
        raise UserError(f"bad value {text!r} for {full_key}: {exc}") from exc


def _check_type(full_key: str, value: Any) -> Any:
    """Type-check a recipe value (ints are accepted for floats)."""
    kind = _type_of(full_key)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typing.get_origin(kind) is list:
        if isinstance(value, list) and all(isinstance(v, (int, float)) for v in value):
            return [float(v) for v in value]
    elif isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    raise UserError(
        f"{full_key} = {value!r} has the wrong type; expected {getattr(kind, '__name__', kind)}"
    )


def _set(config: TrainConfig, full_key: str, value: Any) -> None:
    section, _, name = full_key.rpartition(".")
    target = getattr(config, section) if section else config
    setattr(target, name, value)


def get_value(config: TrainConfig, full_key: str) -> Any:
    section, _, name = full_key.rpartition(".")
    return getattr(getattr(config, section) if section else config, name)


def config_from_recipe(recipe: dict[str, Any]) -> TrainConfig:
    """Build a TrainConfig from a parsed recipe; unknown keys and wrong types fail clearly."""
    config = TrainConfig()
    for key, value in recipe.items():
        if key.startswith("_"):
            continue
        if key in SECTIONS:
            if not isinstance(value, dict):
                raise UserError(f"recipe key {key!r} must be a [{key}] table")
            for sub, sub_value in value.items():
                full = f"{key}.{sub}"
                if full not in valid_keys():
                    raise UserError(
                        f"unknown recipe setting {full!r}; valid keys: {', '.join(valid_keys())}"
                    )
                _set(config, full, _check_type(full, sub_value))
        elif key in TOP_LEVEL:
            _set(config, key, _check_type(key, value))
        else:
            raise UserError(
                f"unknown recipe setting {key!r}; valid keys: {', '.join(valid_keys())}"
            )
    return config


def apply_overrides(config: TrainConfig, overrides: list[str]) -> dict[str, Any]:
    """Apply ``key=value`` strings in order; returns {full key: parsed value}."""
    applied: dict[str, Any] = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"override {item!r} is not key=value (e.g. train.steps=500)")
        full = resolve_key(key.strip())
        value = parse_value(full, text.strip())
        _set(config, full, value)
        applied[full] = value
    return applied


def load_train_config(recipe: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """Recipe name or file + overrides -> validated TrainConfig."""
    from maskattn_deploy.recipes import load_recipe

    config = config_from_recipe(load_recipe("train", str(recipe)))
    apply_overrides(config, list(overrides or []))
    return config.validate()


def config_from_dict(values: dict[str, Any]) -> TrainConfig:
    """Inverse of :meth:`TrainConfig.to_dict` (used when resuming a run)."""
    return config_from_recipe(values).validate()


def diff_configs(old: TrainConfig, new: TrainConfig, ignore: tuple[str, ...] = ()) -> list[str]:
    """Human-readable differences ``key: old -> new`` between two configs."""
    changes = []
    for key in valid_keys():
        if key.split(".")[0] in ignore or key in ignore:
            continue
        a, b = get_value(old, key), get_value(new, key)
        if a != b:
            changes.append(f"{key}: {a!r} -> {b!r}")
    return changes
