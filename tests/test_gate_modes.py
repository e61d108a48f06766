"""Gate modes: one immutable GateMode per GateSet, changed only through ``gates.mode(...)``."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from maskattn_deploy.gating import (
    AttentionImpl,
    Estimator,
    GateConfig,
    GateMode,
    install_gates,
)
from maskattn_deploy.gating import processor as processor_module
from maskattn_deploy.models.tiny import build_tiny_unet


def test_mode_coerces_strings_and_refuses_unknown_values() -> None:
    mode = GateMode(attention="op", estimator="relaxed")
    assert mode.attention is AttentionImpl.OP
    assert mode.estimator is Estimator.RELAXED
    with pytest.raises(ValueError, match="unknown attention implementation 'flash'; choose auto"):
        GateMode(attention="flash")
    with pytest.raises(ValueError, match="unknown gate estimator 'soft'; choose bias, relaxed"):
        GateMode.for_training("soft")
    with pytest.raises(TypeError, match="GateMode.training must be a bool"):
        GateMode(training=1)  # type: ignore[arg-type]
    with pytest.raises(dataclasses.FrozenInstanceError):
        mode.training = True  # type: ignore[misc]


def test_mode_context_nests_and_restores_even_on_error() -> None:
    gates = install_gates(build_tiny_unet(), GateConfig())
    default = gates.current_mode
    assert default == GateMode()
    with gates.mode(GateMode.for_training("relaxed")) as outer:
        assert gates.current_mode is outer and outer.training and outer.observing
        with gates.mode(attention="reference") as inner:
            # Changes apply to the mode in force, so the training fields carry over.
            assert inner == outer.replace(attention=AttentionImpl.REFERENCE)
        assert gates.current_mode is outer
    assert gates.current_mode is default
    with pytest.raises(RuntimeError, match="boom"), gates.mode(attention="op"):
        raise RuntimeError("boom")
    assert gates.current_mode is default
    # The old mutable switches are gone: nothing outside can write them any more.
    for name in ("attention_impl", "ste", "observing", "estimator", "set_training"):
        assert not hasattr(gates, name)


def test_each_mode_takes_its_path(monkeypatch) -> None:
    """The mode picks the path in one place: SDPA, an op, the oracle, or the training softmax."""
    calls: list[str] = []
    names = (
        "masked_softmax_op",
        "gated_attention_op",
        "masked_softmax_reference",
        "training_softmax",
    )
    real = {name: getattr(processor_module, name) for name in names}

    def spy(name: str):  # noqa: ANN202
        def call(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            calls.append(name)
            return real[name](*args, **kwargs)

        return call

    for name in real:
        monkeypatch.setattr(processor_module, name, spy(name))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(
        processor_module.F,
        "scaled_dot_product_attention",
        lambda *a, **k: calls.append("sdpa") or sdpa(*a, **k),
    )
    unet = build_tiny_unet()
    gates = install_gates(unet, GateConfig(stage="mid", placement="encoder"))
    layer = gates.layers[0]
    attn = unet.get_submodule(layer)
    x, ctx = torch.randn(1, 4, attn.query_dim), torch.randn(1, 77, attn.cross_attention_dim)
    expected = {
        GateMode(): "sdpa",  # auto on the CPU
        GateMode(attention="sdpa"): "sdpa",
        GateMode(attention="op"): "masked_softmax_op",
        GateMode(attention="fused"): "gated_attention_op",
        GateMode(attention="flex"): "gated_attention_op",
        GateMode(attention="reference"): "masked_softmax_reference",
        GateMode.for_training(): "training_softmax",
        GateMode(attention="sdpa", training=True): "training_softmax",
    }
    for mode, path in expected.items():
        calls.clear()
        with torch.no_grad(), gates.mode(mode):
            attn(x, encoder_hidden_states=ctx)
        assert calls == [path], mode
