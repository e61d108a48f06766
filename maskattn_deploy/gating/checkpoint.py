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

from maskattn_deploy.errors import CheckpointError
from maskattn_deploy.gating.config import GateConfig
from maskattn_deploy.gating.gateset import GateSet, install_gates
from maskattn_deploy.gating.placement import select_layers
from maskattn_deploy.utils import atomic_path, sha256_file, write_json_atomic

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
    """Write ``ckpt`` into ``out_dir`` atomically (tensors first, sidecar with their hash last)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CheckpointError(f"cannot create {out}: {exc.strerror}") from exc
    with atomic_path(out / TENSORS_NAME) as tmp:
        save_file(ckpt.state_dict, str(tmp), metadata={"format": FORMAT})
        digest = sha256_file(tmp)
    sidecar = ckpt.sidecar() | {"tensors_sha256": digest}
    write_json_atomic(out / SIDECAR_NAME, sidecar)
    ckpt.sha256 = digest
    return out


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
    if sidecar.get("format") != FORMAT:
        raise CheckpointError(
            f"{sidecar_path} has format {sidecar.get('format')!r}, expected {FORMAT!r}"
        )
    digest = sha256_file(tensors_path)
    if sidecar.get("tensors_sha256") not in (None, digest):
        raise CheckpointError(
            f"{tensors_path} is truncated or corrupt (SHA-256 differs from {SIDECAR_NAME}); "
            "re-copy or re-export the checkpoint"
        )
    try:
        state = load_file(str(tensors_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{tensors_path} is corrupt or truncated: {exc}") from exc
    return GateCheckpoint(
        config=GateConfig.from_dict(sidecar["config"]),
        layer_to_head=sidecar["layers"],
        layer_stage=sidecar.get("stages", {}),
        state_dict=state,
        unet_fingerprint=sidecar.get("unet_fingerprint"),
        step=sidecar.get("step"),
        metadata=sidecar.get("metadata", {}),
        source=sidecar.get("source", "maskattn-deploy"),
        sha256=digest,
    )


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


def import_reference_checkpoint(path: str | Path) -> GateCheckpoint:
    """Convert a reference ``gate_final.pt`` (format maskattn-sdxl-gates-v1) to ours.

    Loaded with ``weights_only=True``: only tensors and plain containers are accepted. The
    reference thresholds sigmoid(g) > p; we threshold g > logit(p), which is the same set of
    gates except for |g| below ~1e-7 where fp32 sigmoid rounds to exactly p.
    """
    try:
        raw = torch.load(Path(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors vary: truncated zip, disallowed globals...
        raise CheckpointError(
            f"cannot read {path} as a reference gate checkpoint (safe loading, weights only): "
            f"{str(exc).splitlines()[0]}"
        ) from exc
    if not isinstance(raw, dict) or raw.get("format") != REFERENCE_FORMAT:
        raise CheckpointError(f"{path} is not a {REFERENCE_FORMAT} checkpoint")
    ref_cfg = raw.get("maskattn_config", {})
    p = float(ref_cfg.get("threshold", 0.5))
    threshold = math.log(p / (1 - p)) if 0 < p < 1 else (float("-inf") if p <= 0 else float("inf"))
    config = GateConfig(
        stage=ref_cfg.get("stage", "mid"),
        placement=_REF_PLACEMENT[ref_cfg.get("placement", "encoder_decoder")],
        share_heads=bool(ref_cfg.get("share_gate_heads_by_stage", True)),
        hidden_dim=int(ref_cfg.get("gate_hidden_dim", 128)),
        threshold=threshold,
    )
    layers = [name.removesuffix(".processor") for name in raw["selected_layers"]]
    stages = {
        name.removesuffix(".processor"): s for name, s in raw.get("stage_by_layer", {}).items()
    }
    layer_to_head, state = _reference_heads(raw["gate_state_dict"], layers, stages, config)
    return GateCheckpoint(
        config=config,
        layer_to_head=layer_to_head,
        layer_stage={name: stages.get(name, "") for name in layers},
        state_dict=state,
        unet_fingerprint=None,  # the reference format does not record one
        step=raw.get("global_step"),
        metadata={"imported_from": str(path), "checkpoint_kind": raw.get("checkpoint_kind")},
        source=REFERENCE_FORMAT,
    )


def _reference_heads(
    ref_state: dict[str, torch.Tensor],
    layers: list[str],
    stages: dict[str, str],
    config: GateConfig,
) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """Group the per-layer reference tensors into our heads; shared heads must agree."""
    layer_to_head: dict[str, str] = {}
    state: dict[str, torch.Tensor] = {}
    for layer in layers:
        prefix = f"{layer}.processor.gate_head."
        params = {k[len(prefix) :]: v for k, v in ref_state.items() if k.startswith(prefix)}
        if not params:
            raise CheckpointError(f"reference checkpoint has no gate tensors for {layer}")
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
