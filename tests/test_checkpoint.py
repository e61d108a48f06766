"""Gate checkpoints: round trip, architecture guard, corruption, reference-format import."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from maskattn_deploy.errors import CheckpointError
from maskattn_deploy.gating import GateConfig, install_gates, remove_gates
from maskattn_deploy.gating.checkpoint import load_gates, read_checkpoint, save_gates
from maskattn_deploy.models.fingerprint import unet_fingerprint
from maskattn_deploy.models.tiny import build_tiny_sd15_unet, build_tiny_unet


def trained_like(unet: torch.nn.Module, config: GateConfig, seed: int = 0):
    gates = install_gates(unet, config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in gates.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return gates


def test_round_trip_is_exact(tmp_path: Path) -> None:
    unet = build_tiny_unet()
    gates = trained_like(unet, GateConfig(stage="all", share_heads=False))
    save_gates(gates, unet, tmp_path / "ck", step=42, metadata={"note": "x"})
    remove_gates(unet)
    loaded = load_gates(tmp_path / "ck", unet)
    assert loaded.config == gates.config and loaded.layers == gates.layers
    for (k1, v1), (k2, v2) in zip(
        gates.state_dict().items(), loaded.state_dict().items(), strict=True
    ):
        assert k1 == k2 and torch.equal(v1, v2)
    ckpt = read_checkpoint(tmp_path / "ck" / "gates.safetensors")
    assert ckpt.step == 42 and ckpt.metadata == {"note": "x"}
    assert ckpt.unet_fingerprint == unet_fingerprint(unet)
    assert not list((tmp_path / "ck").glob("*.tmp"))  # no temp files left behind


def test_other_architecture_is_refused_naming_both_fingerprints(tmp_path: Path) -> None:
    unet = build_tiny_unet()
    save_gates(trained_like(unet, GateConfig()), unet, tmp_path / "ck")
    other = build_tiny_sd15_unet()
    with pytest.raises(CheckpointError) as err:
        load_gates(tmp_path / "ck", other)
    assert unet_fingerprint(unet) in str(err.value) and unet_fingerprint(other) in str(err.value)


def test_truncated_tensor_file_fails_clearly(tmp_path: Path) -> None:
    unet = build_tiny_unet()
    save_gates(trained_like(unet, GateConfig()), unet, tmp_path / "ck")
    tensors = tmp_path / "ck" / "gates.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        read_checkpoint(tmp_path / "ck")


def test_corrupt_sidecar_and_missing_files_fail_clearly(tmp_path: Path) -> None:
    unet = build_tiny_unet()
    save_gates(trained_like(unet, GateConfig()), unet, tmp_path / "ck")
    (tmp_path / "ck" / "gates.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        read_checkpoint(tmp_path / "ck")
    with pytest.raises(CheckpointError, match="does not exist"):
        read_checkpoint(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a gate checkpoint"):
        read_checkpoint(tmp_path / "empty")


def test_safetensors_garbage_without_hash_fails_clearly(tmp_path: Path) -> None:
    unet = build_tiny_unet()
    save_gates(trained_like(unet, GateConfig()), unet, tmp_path / "ck")
    side = json.loads((tmp_path / "ck" / "gates.json").read_text())
    side.pop("tensors_sha256")
    (tmp_path / "ck" / "gates.json").write_text(json.dumps(side))
    (tmp_path / "ck" / "gates.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        read_checkpoint(tmp_path / "ck")


# --- reference format (ychang64/MaskAttn-SDXL, "maskattn-sdxl-gates-v1") ---------------------

REF_STAGE = {
    "down_blocks.2": "mid",
    "up_blocks.0": "mid",
    "down_blocks.1": "high",
    "up_blocks.1": "high",
}


def write_reference_checkpoint(path: Path, unet: torch.nn.Module, seed: int = 0) -> dict:
    """Build a checkpoint the way the reference's save_maskattn_checkpoint lays it out."""
    g = torch.Generator().manual_seed(seed)
    layers = [
        n
        for n, m in unet.named_modules()
        if n.endswith("attn2") and n.split(".attentions")[0] in ("down_blocks.2", "up_blocks.0")
    ]
    shared: dict[str, torch.Tensor] = {}

    def mlp(prefix: str, din: int) -> None:
        shared[f"{prefix}.0.weight"] = 1 + 0.1 * torch.randn(din, generator=g)
        shared[f"{prefix}.0.bias"] = 0.1 * torch.randn(din, generator=g)
        shared[f"{prefix}.1.weight"] = torch.randn(128, din, generator=g) / din**0.5
        shared[f"{prefix}.1.bias"] = 0.1 * torch.randn(128, generator=g)
        shared[f"{prefix}.3.weight"] = torch.randn(128, 128, generator=g) / 128**0.5
        shared[f"{prefix}.3.bias"] = 0.1 * torch.randn(128, generator=g)

    mlp("feature_net", 128)
    mlp("token_net", 64)
    shared["logit_bias"] = torch.tensor(0.05)
    state = {f"{layer}.processor.gate_head.{k}": v for layer in layers for k, v in shared.items()}
    raw = {
        "format": "maskattn-sdxl-gates-v1",
        "checkpoint_kind": "trained",
        "maskattn_config": {
            "stage": "mid",
            "placement": "encoder_decoder",
            "threshold": 0.5,
            "negative_value": -1e4,
            "gate_hidden_dim": 128,
            "share_gate_heads_by_stage": True,
        },
        "selected_layers": [f"{layer}.processor" for layer in layers],
        "stage_by_layer": {
            f"{layer}.processor": REF_STAGE[layer.split(".attentions")[0]] for layer in layers
        },
        "gate_state_dict": state,
        "optimizer": None,
        "global_step": 1000,
    }
    torch.save(raw, path)
    return shared


def reference_mask(shared: dict, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
    """The reference semantics re-implemented: sigmoid(u v^T/sqrt(k) + b) > 0.5, argmax fallback."""

    def mlp(prefix: str, z: torch.Tensor) -> torch.Tensor:
        z = torch.nn.functional.layer_norm(
            z, z.shape[-1:], shared[f"{prefix}.0.weight"], shared[f"{prefix}.0.bias"]
        )
        z = torch.nn.functional.silu(
            z @ shared[f"{prefix}.1.weight"].T + shared[f"{prefix}.1.bias"]
        )
        return z @ shared[f"{prefix}.3.weight"].T + shared[f"{prefix}.3.bias"]

    prob = torch.sigmoid(
        mlp("feature_net", x) @ mlp("token_net", ctx).transpose(1, 2) / 128**0.5
        + shared["logit_bias"]
    )
    hard = prob > 0.5
    empty = ~hard.any(-1, keepdim=True)
    fallback = torch.zeros_like(hard).scatter_(-1, prob.argmax(-1, keepdim=True), True)
    return torch.where(empty, fallback, hard)


def test_reference_import_gives_identical_masks(tmp_path: Path) -> None:
    unet = build_tiny_unet()
    shared = write_reference_checkpoint(tmp_path / "gate_final.pt", unet)
    ckpt = read_checkpoint(tmp_path / "gate_final.pt")
    assert ckpt.source == "maskattn-sdxl-gates-v1" and ckpt.step == 1000
    assert ckpt.config.placement == "both" and ckpt.config.threshold == 0.0
    gates = load_gates(ckpt, unet)
    assert list(gates.heads) == ["mid_128"]  # one shared head for the mid stage
    g = torch.Generator().manual_seed(5)
    x, ctx = torch.randn(2, 64, 128, generator=g), torch.randn(2, 77, 64, generator=g)
    from maskattn_deploy.ops.reference import open_mask

    with torch.no_grad():
        ours = open_mask(gates.gate_logits(gates.layers[0], x, ctx))
        theirs = reference_mask(shared, x, ctx)
    assert torch.equal(ours, theirs)
    assert 0.05 < ours.float().mean() < 0.95  # a non-trivial mask


@pytest.mark.parametrize(
    ("call", "found"), [((print, ("pwned",)), "print"), ((os.system, ("true",)), "system")]
)
def test_reference_import_refuses_pickled_objects(tmp_path: Path, call, found: str) -> None:
    class Evil:
        def __reduce__(self):
            return call

    torch.save({"format": "maskattn-sdxl-gates-v1", "x": Evil()}, tmp_path / "gate_final.pt")
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(tmp_path / "gate_final.pt")
    message = str(err.value)
    # Says why and what was found; never suggests turning safe loading off.
    assert "refused for safety" in message and found in message, message
    assert "weights_only" not in message and "\n" not in message, message


def test_reference_import_of_other_format_fails(tmp_path: Path) -> None:
    torch.save({"format": "something-else"}, tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match="not a maskattn-sdxl-gates-v1"):
        read_checkpoint(tmp_path / "x.pt")
