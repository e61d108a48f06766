"""Gating on diffusers UNets: equivalence, explicit attention, gradients, STE, placement."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from maskattn_deploy.gating import (
    AttentionImpl,
    GateConfig,
    GateMode,
    install_gates,
    installed_gates,
    remove_gates,
    select_layers,
)
from maskattn_deploy.gating.mask import straight_through_gate, training_softmax
from maskattn_deploy.models.tiny import build_tiny_sd15_unet, build_tiny_unet
from maskattn_deploy.ops.reference import masked_softmax_reference, open_mask


def sdxl_inputs(unet: torch.nn.Module, batch: int = 2, size: int = 16) -> dict:
    g = torch.Generator().manual_seed(0)
    text_dim = unet.config.cross_attention_dim
    pooled = (
        unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
    )
    return dict(
        sample=torch.randn(batch, 4, size, size, generator=g),
        timestep=torch.tensor([500.0] * batch),
        encoder_hidden_states=torch.randn(batch, 77, text_dim, generator=g),
        added_cond_kwargs={
            "text_embeds": torch.randn(batch, pooled, generator=g),
            "time_ids": torch.tensor([[256.0, 256.0, 0.0, 0.0, 256.0, 256.0]] * batch),
        },
    )


def sd15_inputs(unet: torch.nn.Module) -> dict:
    g = torch.Generator().manual_seed(0)
    return dict(
        sample=torch.randn(2, 4, 16, 16, generator=g),
        timestep=torch.tensor([10.0, 900.0]),
        encoder_hidden_states=torch.randn(2, 77, unet.config.cross_attention_dim, generator=g),
    )


def randomize(gates: torch.nn.Module, seed: int = 0, std: float = 0.5) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in gates.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


@pytest.mark.parametrize(
    ("build", "inputs"), [(build_tiny_unet, sdxl_inputs), (build_tiny_sd15_unet, sd15_inputs)]
)
def test_forced_open_equals_stock_processor(build, inputs) -> None:
    unet = build()
    unet.set_attn_processor(AttnProcessor2_0())
    feed = inputs(unet)
    with torch.no_grad():
        stock = unet(**feed).sample
        gates = install_gates(unet, GateConfig(stage="all"))
        randomize(gates)
        with gates.forced_open():
            gated = unet(**feed).sample
        masked = unet(**feed).sample
    assert torch.allclose(gated, stock, atol=1e-5)  # fp32: explicit softmax vs SDPA rounding
    assert not torch.allclose(masked, stock, atol=1e-3)  # real gates change the output


@pytest.mark.parametrize("impl", ["sdpa", "op", "fused", "flex"])
def test_processor_matches_explicit_attention_and_zeros_masked(impl: str) -> None:
    unet = build_tiny_unet()
    gates = install_gates(unet, GateConfig(stage="mid"))
    randomize(gates, seed=3)
    name = gates.layers[0]
    attn = unet.get_submodule(name)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, attn.query_dim, generator=g)  # [b, n, c]
    ctx = torch.randn(2, 77, attn.cross_attention_dim, generator=g)  # [b, t, e]
    head = gates.heads[gates.layer_to_head[name]]
    with torch.no_grad():  # centre the gate logits so about half the gates are open
        head.bias.sub_(
            (head.latent_mlp(x) @ head.text_mlp(ctx).transpose(1, 2)).median() * head.scale
            + head.bias
        )
    with torch.no_grad(), gates.recording() as rec, gates.mode(attention=impl):
        out = attn(x, encoder_hidden_states=ctx)
        # Independent computation, written out.
        u = head.latent_mlp(x)
        v = head.text_mlp(ctx)
        glog = u @ v.transpose(1, 2) / head.hidden_dim**0.5 + head.bias  # [b, n, t]
        is_open = glog > 0
        empty = ~is_open.any(-1)
        is_open[empty] = torch.nn.functional.one_hot(glog[empty].argmax(-1), 77).bool()
        h = attn.heads
        q = attn.to_q(x).view(2, 16, h, -1).transpose(1, 2)
        k = attn.to_k(ctx).view(2, 77, h, -1).transpose(1, 2)
        vv = attn.to_v(ctx).view(2, 77, h, -1).transpose(1, 2)
        s = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
        s = s.masked_fill(~is_open[:, None], float("-inf"))
        p = torch.softmax(s, -1)
        o = (p @ vv).transpose(1, 2).reshape(2, 16, -1)
        expected = attn.to_out[0](o)
    assert torch.allclose(out, expected, atol=1e-5)  # fp32 matmul order differences
    assert torch.equal(rec[name][0], is_open)  # recorded masks are the masks used
    assert 0.05 < is_open.float().mean() < 0.95  # the case is not trivially all-open/closed


def test_masked_entries_get_exactly_zero_probability() -> None:
    from maskattn_deploy.ops.torch_op import masked_softmax_op

    g = torch.Generator().manual_seed(0)
    s, gl = torch.randn(2, 2, 8, 77, generator=g), torch.randn(2, 1, 8, 77, generator=g)
    p = masked_softmax_op(s, gl)
    closed = (gl <= 0).expand_as(p)
    fallback_rows = ~(gl > 0).any(-1, keepdim=True).expand_as(p)
    assert torch.all(p[closed & ~fallback_rows] == 0)
    assert torch.all(p[~closed] > 0)  # open tokens keep positive probability


def test_only_gates_get_gradients_and_backbone_is_unchanged() -> None:
    unet = build_tiny_unet()
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    gates = install_gates(unet, GateConfig(stage="all"))
    with gates.mode(GateMode.for_training()):
        unet(**sdxl_inputs(unet)).sample.square().mean().backward()
    assert all(p.grad is None for p in unet.parameters())
    assert all(not p.requires_grad for p in unet.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in gates.parameters())
    remove_gates(unet)
    after = unet.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_remove_restores_exactly_what_install_changed() -> None:
    """After install + remove the UNet is the user's module again: the same processor objects,
    every parameter's requires_grad flag (a mix here, as a user fine-tuning part of it would
    have), no hooks and no attributes left behind."""
    unet = build_tiny_unet()
    unet.requires_grad_(True)
    unet.conv_in.requires_grad_(False)
    processors = dict(unet.attn_processors)
    flags = {name: p.requires_grad for name, p in unet.named_parameters()}
    attributes = set(unet.__dict__)
    hooks = (dict(unet._forward_pre_hooks), dict(unet._forward_hooks))
    assert True in flags.values() and False in flags.values()

    gates = install_gates(unet, GateConfig(stage="all"))
    assert not any(p.requires_grad for p in unet.parameters())  # install freezes the backbone
    assert remove_gates(unet) is gates
    assert {name: p.requires_grad for name, p in unet.named_parameters()} == flags
    restored = unet.attn_processors
    assert restored.keys() == processors.keys()
    assert all(restored[k] is processors[k] for k in processors)
    assert (dict(unet._forward_pre_hooks), dict(unet._forward_hooks)) == hooks
    assert set(unet.__dict__) == attributes
    assert remove_gates(unet) is None  # nothing installed any more
    install_gates(unet, GateConfig())  # and it can be gated again


def test_install_and_remove_through_a_compiled_wrapper() -> None:
    unet = build_tiny_unet()
    compiled = torch.compile(unet, backend="eager")  # wraps; compiles on the first call only
    gates = install_gates(compiled, GateConfig())
    assert installed_gates(unet) is gates and installed_gates(compiled) is gates
    assert remove_gates(compiled) is gates
    assert installed_gates(unet) is None and installed_gates(compiled) is None


def test_ste_forward_is_hard_mask_and_backward_is_sigmoid() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=g, dtype=torch.float64).requires_grad_(True)
    weights = torch.randn(2, 5, 7, generator=g, dtype=torch.float64)
    ste = straight_through_gate(logits, threshold=0.3)
    hard = (logits > 0.3).double()
    empty = hard.sum(-1) == 0
    assert not empty.any()  # this case has no fallback rows, so hard == threshold
    assert torch.equal(ste.detach(), hard)
    (ste * weights).sum().backward()
    # Numerical derivative of the sigmoid surrogate sum(w * sigmoid(g - thr)).
    eps = 1e-6
    surrogate = lambda z: (weights * torch.sigmoid(z - 0.3)).sum()  # noqa: E731
    num = torch.zeros_like(logits)
    flat = logits.detach().clone().view(-1)
    for i in range(flat.numel()):
        plus, minus = flat.clone(), flat.clone()
        plus[i] += eps
        minus[i] -= eps
        num.view(-1)[i] = (surrogate(plus.view_as(logits)) - surrogate(minus.view_as(logits))) / (
            2 * eps
        )
    assert torch.allclose(logits.grad, num, atol=1e-8)  # central differences in fp64


def _estimator_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 3, 4, 9, generator=g) * 3  # [b, h, n, t]
    gate = torch.randn(2, 4, 9, generator=g)  # [b, n, t]
    gate[1, 2] = -torch.rand(9, generator=g) - 0.5  # an all-closed row: argmax fallback
    upstream = torch.randn(2, 3, 4, 9, generator=g)
    return logits, gate, upstream


@pytest.mark.parametrize("estimator", ["bias", "relaxed"])
def test_training_estimators_forward_is_the_exact_masked_softmax(estimator: str) -> None:
    logits, gate, _ = _estimator_case()
    got = training_softmax(logits, gate, 0.0, estimator)
    exact = masked_softmax_reference(logits, gate[:, None], 0.0)
    closed = ~open_mask(gate, 0.0)[:, None].expand_as(logits)
    assert (got[closed] == 0).all()  # exactly zero, as at inference
    # relaxed: exact + (x - x) is bit-exact; bias: exp(-1e4) underflows to 0, fp32 rounding only.
    torch.testing.assert_close(got, exact, atol=1e-6 if estimator == "bias" else 0, rtol=0)


def test_relaxed_estimator_gradients() -> None:
    logits, gate, upstream = _estimator_case()
    s, g = logits.clone().requires_grad_(True), gate.clone().requires_grad_(True)
    (training_softmax(s, g, 0.0, "relaxed") * upstream).sum().backward()
    # Independent expectations: the gate gradient of softmax(s + log sigmoid(g)) and the logit
    # gradient of the exact masked softmax, each by autograd on its own formula.
    g_ref = gate.clone().requires_grad_(True)
    relaxed = torch.softmax(logits + torch.nn.functional.logsigmoid(g_ref)[:, None], dim=-1)
    (relaxed * upstream).sum().backward()
    s_ref = logits.clone().requires_grad_(True)
    (masked_softmax_reference(s_ref, gate[:, None], 0.0) * upstream).sum().backward()
    torch.testing.assert_close(g.grad, g_ref.grad, atol=1e-6, rtol=1e-5)  # fp32 rounding
    torch.testing.assert_close(s.grad, s_ref.grad, atol=1e-6, rtol=1e-5)  # fp32 rounding
    # The point of it: closed gates get a gradient (with the bias estimator theirs is exactly 0).
    closed = ~open_mask(gate, 0.0)
    assert (g.grad[closed] != 0).all()
    g_bias = gate.clone().requires_grad_(True)
    (training_softmax(logits, g_bias, 0.0, "bias") * upstream).sum().backward()
    assert (g_bias.grad[closed] == 0).all()


def test_unknown_estimator_is_refused() -> None:
    logits, gate, _ = _estimator_case()
    with pytest.raises(ValueError, match="unknown gate estimator 'soft'; choose bias, relaxed"):
        training_softmax(logits, gate, 0.0, "soft")


def test_training_mode_forward_equals_inference_forward() -> None:
    unet = build_tiny_unet()
    gates = install_gates(unet, GateConfig(stage="all"))
    randomize(gates, seed=4)
    feed = sdxl_inputs(unet)
    with torch.no_grad():
        exact = unet(**feed).sample
        with gates.mode(attention=AttentionImpl.OP):
            op = unet(**feed).sample
        with gates.mode(GateMode.for_training()):
            ste = unet(**feed).sample
    assert torch.allclose(op, exact, atol=1e-5)  # op vs SDPA+bias: fp32 rounding
    assert torch.allclose(exact, ste, atol=1e-5)  # -1e4 bias underflows to exactly 0 in fp32


def test_gates_stay_fp32_under_bf16_unet() -> None:
    unet = build_tiny_unet().to(torch.bfloat16)
    gates = install_gates(unet, GateConfig())
    feed = sdxl_inputs(unet)
    feed = {k: v.to(torch.bfloat16) if isinstance(v, torch.Tensor) else v for k, v in feed.items()}
    feed["added_cond_kwargs"] = {
        k: v.to(torch.bfloat16) for k, v in feed["added_cond_kwargs"].items()
    }
    with torch.no_grad():
        out = unet(**feed).sample
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert all(p.dtype == torch.float32 for p in gates.parameters())
    x = torch.randn(1, 4, gates.layer_info[gates.layers[0]].latent_dim, dtype=torch.bfloat16)
    ctx = torch.randn(1, 77, 64, dtype=torch.bfloat16)
    assert gates.gate_logits(gates.layers[0], x, ctx).dtype == torch.float32


def test_gate_logits_stay_fp32_inside_autocast() -> None:
    unet = build_tiny_unet()
    gates = install_gates(unet, GateConfig())
    layer = gates.layers[0]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, gates.layer_info[layer].latent_dim, generator=gen)
    ctx = torch.randn(2, 77, 64, generator=gen)
    plain = gates.gate_logits(layer, x, ctx)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.mm(x[0], x[0].T).dtype == torch.bfloat16  # autocast is really active
        inside = gates.gate_logits(layer, x, ctx)
    assert inside.dtype == torch.float32
    # Same fp32 computation with autocast switched off inside: bit-identical.
    assert torch.equal(inside, plain)


def test_placement_stages_on_tiny_match_sdxl_names() -> None:
    unet = build_tiny_unet()
    stages = {
        layer.name.split(".attentions")[0]: layer.stage
        for layer in select_layers(unet, GateConfig(stage="all"))
    }
    assert stages == {
        "down_blocks.1": "high",
        "down_blocks.2": "mid",
        "up_blocks.0": "mid",
        "up_blocks.1": "high",
        "mid_block": "low",
    }
    mid_enc = select_layers(unet, GateConfig(stage="mid", placement="encoder"))
    assert {layer.name.split(".")[0] for layer in mid_enc} == {"down_blocks"}
    dec = select_layers(unet, GateConfig(stage="all", placement="decoder"))
    assert all(layer.name.startswith("up_blocks") for layer in dec)
    with pytest.raises(ValueError, match="mid block"):
        select_layers(unet, GateConfig(stage="low", placement="encoder"))


def test_share_heads_per_stage_or_per_layer() -> None:
    shared = install_gates(build_tiny_unet(), GateConfig(stage="all", share_heads=True))
    assert sorted(shared.heads) == ["high_64", "low_128", "mid_128"]
    separate = install_gates(build_tiny_unet(), GateConfig(stage="mid", share_heads=False))
    assert len(separate.heads) == len(separate.layers) == 10


def test_sd15_placement_and_no_cross_attention_error() -> None:
    unet = build_tiny_sd15_unet()
    layers = select_layers(unet, GateConfig(stage="high"))
    assert {layer.name.split(".attentions")[0] for layer in layers} == {
        "down_blocks.0",
        "up_blocks.3",
    }
    plain = copy.deepcopy(unet)
    for name, module in list(plain.named_modules()):
        if name.endswith("attn2"):
            module.is_cross_attention = False
    with pytest.raises(ValueError, match="no cross-attention"):
        select_layers(plain, GateConfig())


def test_double_install_is_refused() -> None:
    unet = build_tiny_unet()
    install_gates(unet, GateConfig())
    with pytest.raises(ValueError, match="already installed"):
        install_gates(unet, GateConfig())


@pytest.mark.parametrize("impl", ["op", "sdpa", "fused"])
def test_gated_unet_compiles_to_one_graph(monkeypatch, impl: str) -> None:
    """torch.compile traces the gated UNet without a graph break, so a compiled masked UNet is
    one graph like the stock one (graph breaks in every gated layer made the first H200 run's
    compiled masked step 5x the unmasked one), and the forward never registers kernels."""
    import torch._dynamo as dynamo
    from maskattn_deploy.plugins import torch_kernel

    from maskattn_deploy.gating import processor

    unet = build_tiny_unet().eval()
    gates = install_gates(unet, GateConfig(stage="mid"))
    randomize(gates)
    feed = sdxl_inputs(unet)

    def forbidden() -> bool:
        raise AssertionError("kernel registration inside the forward")

    # Forget the cached registration, so any call from the forward reaches `forbidden`.
    processor._register_cuda_kernel.cache_clear()
    monkeypatch.setattr(torch_kernel, "register", forbidden)

    def step(**kw):
        with torch.no_grad(), gates.mode(attention=impl):
            return unet(**kw, return_dict=False)[0]

    text_mlp_runs: list[str] = []  # traced with the graph: appended each time the graph runs
    for key, head in gates.heads.items():
        head.text_mlp.register_forward_hook(lambda *_, _key=key: text_mlp_runs.append(_key))
    dynamo.reset()
    try:
        explained = dynamo.explain(step)(**feed)
    finally:
        dynamo.reset()
        processor._register_cuda_kernel.cache_clear()  # later installs register for real
    assert explained.graph_break_count == 0, [str(b.reason) for b in explained.break_reasons]
    assert explained.graph_count == 1
    # The shared head's text MLP is in the graph once, not once per gated layer.
    assert text_mlp_runs == list(gates.heads) and len(gates.layers) > 1
