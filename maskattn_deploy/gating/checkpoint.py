"""Gate checkpoints: ``gates.safetensors`` + ``gates.json`` sidecar, and the reference import.

Our format (a folder)::

    gates.safetensors   heads.<head_id>.<param> tensors (fp32)
    gates.json          format, gate config, layer -> head map, UNet fingerprint, step,
                        metadata, SHA-256 of gates.safetensors

The JSON is written last and carries the tensor file's hash, so a crash or a truncated copy is
detected on load with a clear message. The paper authors' ``gate_final.pt`` (format
"maskattn-sdxl-gates-v1") is imported with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from maskattn_deploy.checks import Fields
from maskattn_deploy.errors import CheckpointError
from maskattn_deploy.gating.config import PLACEMENTS, STAGES, GateConfig
from maskattn_deploy.gating.gateset import GateSet, install_gates
from maskattn_deploy.gating.placement import select_layers
from maskattn_deploy.utils import (
    atomic_dir,
    atomic_path,
    load_weights_only,
    sha256_file,
    write_json_atomic,
)

FORMAT = "maskattn-deploy-gates/1"
REFERENCE_FORMAT = "maskattn-sdxl-gates-v1"
TENSORS_NAME = "gates.safetensors"
SIDECAR_NAME = "gates.json"


@dataclass
class GateCheckpoint:
    """A gate checkpoint in memory (our format)."""

    config: GateConfig
    layer_to_head: dict[str, str]
    layer_stage: dict[str, str]
    state_dict: dict[str, torch.Tensor]
    unet_fingerprint: str | None
    step: int | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    source: str = "maskattn-deploy"
    sha256: str | None = None

    @property
    def num_parameters(self) -> int:
        return sum(t.numel() for t in self.state_dict.values())

    def sidecar(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "config": self.config.to_dict(),
            "layers": self.layer_to_head,
            "stages": self.layer_stage,
            "unet_fingerprint": self.unet_fingerprint,
            "step": self.step,
            "metadata": self.metadata,
            "source": self.source,
        }


def checkpoint_from_gates(
    gates: GateSet, unet: torch.nn.Module, step: int | None = None, metadata: dict | None = None
) -> GateCheckpoint:
    from maskattn_deploy.models.fingerprint import unet_fingerprint

    return GateCheckpoint(
        config=gates.config,
        layer_to_head=dict(gates.layer_to_head),
        layer_stage={name: gates.stage_of(name) for name in gates.layers},
        state_dict={
            k: v.detach().float().cpu().contiguous() for k, v in gates.state_dict().items()
        },
        unet_fingerprint=unet_fingerprint(unet),
        step=step,
        metadata=dict(metadata or {}),
    )


def write_checkpoint(ckpt: GateCheckpoint, out_dir: str | Path) -> Path:
    """Write ``ckpt`` into ``out_dir``.

    A new folder, or one that holds only a gate checkpoint, is replaced as a whole (written
    beside it, then renamed), so a crash leaves the old checkpoint or the new one. Into a folder
    with other files (a training checkpoint being assembled) the tensors are written first and
    the sidecar with their hash last, so an interrupted write is detected on load.
    """
    out = Path(out_dir)
    names = {p.name for p in out.iterdir()} if out.is_dir() else set()
    if out.is_dir() and (not names or not names <= {TENSORS_NAME, SIDECAR_NAME}):
        _write_files(ckpt, out)  # an empty folder made for us, or one holding other files
        return out
    with atomic_dir(out, overwrite=True) as tmp:
        _write_files(ckpt, tmp)
    return out


def _write_files(ckpt: GateCheckpoint, out: Path) -> None:
    """Tensors first, then the sidecar carrying their hash."""
    from safetensors.torch import save_file

    try:
        out.mkdir(parents=True, exist_ok=True)
        with atomic_path(out / TENSORS_NAME) as tmp:
            save_file(ckpt.state_dict, str(tmp), metadata={"format": FORMAT})
            digest = sha256_file(tmp)
        sidecar = ckpt.sidecar() | {"tensors_sha256": digest}
        write_json_atomic(out / SIDECAR_NAME, sidecar)
    except OSError as exc:
        raise CheckpointError(
            f"cannot write the gate checkpoint to {out}: {exc.strerror or exc}"
        ) from exc
    ckpt.sha256 = digest


def save_gates(
    gates: GateSet,
    unet: torch.nn.Module,
    out_dir: str | Path,
    step: int | None = None,
    metadata: dict | None = None,
) -> Path:
    """Save the gates installed on ``unet`` as a checkpoint folder."""
    return write_checkpoint(checkpoint_from_gates(gates, unet, step, metadata), out_dir)


def read_checkpoint(path: str | Path) -> GateCheckpoint:
    """Read our format (folder, or its .safetensors/.json file) or the reference ``.pt``."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"gate checkpoint {path} does not exist")
    if path.is_file() and path.suffix in (".pt", ".pth", ".bin"):
        return import_reference_checkpoint(path)
    folder = path if path.is_dir() else path.parent
    return _read_ours(folder)


_OURS_HINT = "; re-save the gates with maskattn-deploy (train, or gates import)"


def _read_ours(folder: Path) -> GateCheckpoint:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    sidecar_path, tensors_path = folder / SIDECAR_NAME, folder / TENSORS_NAME
    if not sidecar_path.is_file() or not tensors_path.is_file():
        raise CheckpointError(
            f"{folder} is not a gate checkpoint: expected {SIDECAR_NAME} and {TENSORS_NAME} "
            "(import a reference gate_final.pt with `maskattn-deploy gates import`)"
        )
    try:
        sidecar = json.loads(sidecar_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{sidecar_path} is corrupt (not valid JSON): {exc}") from exc
    fields = Fields(sidecar, str(sidecar_path), CheckpointError, _OURS_HINT)
    fmt = fields.text("format")
    if fmt != FORMAT:
        raise CheckpointError(f"{sidecar_path} has format {fmt!r}, expected {FORMAT!r}")
    config = _sidecar_config(fields.section("config"))
    layers = fields.str_map("layers", nonempty=True)
    stages = fields.str_map("stages", required=False)
    fingerprint = fields.text("unet_fingerprint", required=False)
    step = fields.integer("step", low=0, required=False)
    metadata = fields.mapping("metadata", required=False) or {}
    source = fields.text("source", required=False, default="maskattn-deploy")
    recorded = fields.text("tensors_sha256", required=False)
    digest = sha256_file(tensors_path)
    if recorded not in (None, digest):
        raise CheckpointError(
            f"{tensors_path} is truncated or corrupt (SHA-256 differs from {SIDECAR_NAME}); "
            "re-copy or re-export the checkpoint"
        )
    try:
        state = load_file(str(tensors_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{tensors_path} is corrupt or truncated: {exc}") from exc
    return GateCheckpoint(
        config=config,
        layer_to_head=layers,
        layer_stage=stages,
        state_dict=state,
        unet_fingerprint=fingerprint,
        step=step,
        metadata=metadata,
        source=source,
        sha256=digest,
    )


def _sidecar_config(section: Fields | None) -> GateConfig:
    """The ``config`` section of gates.json; every field written since format 1 is required."""
    assert section is not None  # required=True raised otherwise
    values = dict(section.data)  # options added later keep their defaults when absent
    values.update(
        stage=section.choice("stage", STAGES),
        placement=section.choice("placement", PLACEMENTS),
        share_heads=section.flag("share_heads"),
        hidden_dim=section.integer("hidden_dim", low=1),
        threshold=section.number("threshold", allow_inf=True),
    )
    try:
        return GateConfig.from_dict(values)
    except (TypeError, ValueError) as exc:
        section.fail(f"field 'config' is invalid: {exc}")
        raise  # unreachable: fail() raises


def load_gates(path: str | Path | GateCheckpoint, unet: torch.nn.Module) -> GateSet:
    """Install gates on ``unet`` and load their weights; refuses another architecture."""
    from maskattn_deploy.models.fingerprint import unet_fingerprint

    ckpt = path if isinstance(path, GateCheckpoint) else read_checkpoint(path)
    current = unet_fingerprint(unet)
    if ckpt.unet_fingerprint is not None and ckpt.unet_fingerprint != current:
        raise CheckpointError(
            f"these gates were trained for UNet {ckpt.unet_fingerprint}, but the model has "
            f"UNet {current}: use gates trained for this model (or retrain them)"
        )
    try:
        layers = select_layers(unet, ckpt.config)
    except ValueError as exc:
        raise CheckpointError(f"these gates do not fit this UNet: {exc}") from exc
    if {layer.name for layer in layers} != set(ckpt.layer_to_head):
        raise CheckpointError(
            "the checkpoint's gated layers do not match this UNet's: use gates trained for this model"
        )
    gates = GateSet(ckpt.config, layers)
    try:
        gates.load_state_dict(ckpt.state_dict, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(
            f"gate weights do not fit this UNet: {str(exc).splitlines()[0]}"
        ) from exc
    gates.to(next(unet.parameters()).device)
    gates.checkpoint_sha256 = ckpt.sha256  # type: ignore[attr-defined]
    return install_gates(unet, ckpt.config, gates)


# --- reference implementation (ychang64/MaskAttn-SDXL) import ------------------------------

_REF_TO_OURS = {"feature_net": "latent_mlp", "token_net": "text_mlp", "logit_bias": "bias"}
_REF_PLACEMENT = {"encoder": "encoder", "decoder": "decoder", "encoder_decoder": "both"}


_REF_HINT = "; expected a gate_final.pt as the reference implementation saves it"
# Tensors of one reference gate head (keys below ``<layer>.processor.gate_head.``).
_REF_TENSORS = tuple(
    f"{net}.{index}.{kind}"
    for net in ("feature_net", "token_net")
    for index in (0, 1, 3)
    for kind in ("weight", "bias")
) + ("logit_bias",)


def import_reference_checkpoint(path: str | Path) -> GateCheckpoint:
    """Convert a reference ``gate_final.pt`` (format maskattn-sdxl-gates-v1) to ours.

    Loaded with ``weights_only=True``: only tensors and plain containers are accepted; a file
    with code or other objects is refused. Every field is checked, and a missing, null,
    mistyped or out-of-range one is a one-line error naming the file and the field.

    Where the imported gates open other tokens than the reference implementation:

    * threshold: the reference opens sigmoid(g) > p, we open g > logit(p); the two differ only
      for |g - logit(p)| below ~1e-7, where fp32 sigmoid rounds to exactly p;
    * row fallback (no token open at a location): both open the most likely token, as
      docs/design.md's masked-softmax contract defines it. We take the argmax of g; the
      reference takes the argmax of sigmoid(g) in fp32, which is the same token while the
      sigmoids are distinct. Below g of about -87.3 fp32 sigmoid leaves the normal range and
      nearby logits can round to the same value, where the reference's tie rule picks the
      lower token index; below about -103.3 every sigmoid is exactly 0 and the reference
      opens token 0 whatever the logits say. We keep the argmax of g: it is the token the
      reference intends (its "highest-probability token"), and it does not depend on where
      fp32 happens to underflow.
    """
    where = str(path)
    raw = load_weights_only(path, CheckpointError, "a reference gate checkpoint")
    if not isinstance(raw, dict) or raw.get("format") != REFERENCE_FORMAT:
        raise CheckpointError(f"{path} is not a {REFERENCE_FORMAT} checkpoint")
    top = Fields(raw, where, CheckpointError, _REF_HINT)
    config = _reference_config(top.section("maskattn_config"))
    layers = [
        name.removesuffix(".processor") for name in top.str_list("selected_layers", nonempty=True)
    ]
    stages = {
        name.removesuffix(".processor"): stage
        for name, stage in top.str_map("stage_by_layer", required=False).items()
    }
    ref_state = top.mapping("gate_state_dict")
    assert ref_state is not None
    for key, value in ref_state.items():
        if not isinstance(value, torch.Tensor):
            top.fail(f"field 'gate_state_dict' entry {key!r} is not a tensor")
    step = top.integer("global_step", low=0, required=False)
    kind = top.text("checkpoint_kind", required=False)
    layer_to_head, state = _reference_heads(ref_state, layers, stages, config, top)
    return GateCheckpoint(
        config=config,
        layer_to_head=layer_to_head,
        layer_stage={name: stages.get(name, "") for name in layers},
        state_dict=state,
        unet_fingerprint=None,  # the reference format does not record one
        step=step,
        metadata={"imported_from": str(path), "checkpoint_kind": kind},
        source=REFERENCE_FORMAT,
    )


def _reference_config(section: Fields | None) -> GateConfig:
    """Our GateConfig from the reference ``maskattn_config`` (absent keys: its defaults)."""
    assert section is not None
    p = section.number("threshold", low=0.0, high=1.0, required=False, default=0.5)
    threshold = math.log(p / (1 - p)) if 0 < p < 1 else (float("-inf") if p <= 0 else float("inf"))
    placement = section.choice(
        "placement", _REF_PLACEMENT, required=False, default="encoder_decoder"
    )
    return GateConfig(
        stage=section.choice("stage", STAGES, required=False, default="mid"),
        placement=_REF_PLACEMENT[placement],  # type: ignore[arg-type]
        share_heads=section.flag("share_gate_heads_by_stage", required=False, default=True),
        hidden_dim=section.integer("gate_hidden_dim", low=1, required=False, default=128),
        threshold=threshold,
    )


def _reference_heads(
    ref_state: dict[str, torch.Tensor],
    layers: list[str],
    stages: dict[str, str],
    config: GateConfig,
    top: Fields,
) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """Group the per-layer reference tensors into our heads; shared heads must agree."""
    layer_to_head: dict[str, str] = {}
    state: dict[str, torch.Tensor] = {}
    for layer in layers:
        prefix = f"{layer}.processor.gate_head."
        params = {k[len(prefix) :]: v for k, v in ref_state.items() if k.startswith(prefix)}
        if not params:
            raise CheckpointError(
                f"reference checkpoint {top.where} has no gate tensors for {layer}"
            )
        _check_reference_head(params, prefix, top)
        width = params["feature_net.0.weight"].shape[0]
        head = (
            f"{stages.get(layer, 'mid')}_{width}" if config.share_heads else layer.replace(".", "_")
        )
        layer_to_head[layer] = head
        for name, tensor in params.items():
            module, _, rest = name.partition(".")
            key = f"heads.{head}.{_REF_TO_OURS[module]}{'.' + rest if rest else ''}"
            tensor = tensor.float().reshape(()) if module == "logit_bias" else tensor.float()
            if key in state and not torch.equal(state[key], tensor):
                raise CheckpointError(f"reference layers sharing head {head} disagree on {name}")
            state[key] = tensor
    return layer_to_head, state


def _check_reference_head(params: dict[str, torch.Tensor], prefix: str, top: Fields) -> None:
    """All seven tensor pairs of a reference gate head, none unknown, with usable shapes."""
    missing = [name for name in _REF_TENSORS if name not in params]
    unknown = sorted(set(params) - set(_REF_TENSORS))
    if missing or unknown:
        what = f"lacks {prefix}{missing[0]}" if missing else f"has unknown {prefix}{unknown[0]}"
        top.fail(f"field 'gate_state_dict' {what}")
    if params["feature_net.0.weight"].ndim != 1:
        top.fail(f"field 'gate_state_dict' entry {prefix}feature_net.0.weight must be 1-D")
    if params["logit_bias"].numel() != 1:
        top.fail(f"field 'gate_state_dict' entry {prefix}logit_bias must hold one value")
