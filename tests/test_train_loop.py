"""The training loop on the tiny model: exact resume, frozen backbone, bad data, cache, time_ids."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from maskattn_deploy.errors import UserError
from maskattn_deploy.gating import Estimator
from maskattn_deploy.train.config import TrainConfig, load_train_config
from maskattn_deploy.train.data import prepare_image
from maskattn_deploy.train.loop import Trainer
from maskattn_deploy.train.synthetic import SyntheticSource

FAST = [
    "data.spec=synthetic:10",  # 10 items, 4 per step: the runs below cross epoch boundaries
    "data.resolution=64",
    "data.caption_dropout=0.3",  # exercises the dropout draws of the run's generator
    "train.batch_size=2",
    "train.grad_accum=2",
    "train.steps=6",
    "optim.warmup_steps=2",
    "log.every=2",
    "log.eval_batch=2",
    "log.checkpoint_every=0",
    "log.progress=false",
    "log.tensorboard=false",
]


def fast_config(*extra: str) -> TrainConfig:
    return load_train_config("tiny-synthetic", [*FAST, *extra])


def gate_tensors(run_dir) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "gates" / "gates.safetensors"))


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """An uninterrupted 6-step run; returns (trainer, result, run folder)."""
    out = tmp_path_factory.mktemp("full") / "run"
    trainer = Trainer(fast_config(), out)
    initial = {k: v.clone() for k, v in trainer.gates.state_dict().items()}
    result = trainer.run()
    return trainer, result, out, initial


def test_stop_and_resume_is_bit_identical(full_run, tmp_path):
    _, full, full_dir, _ = full_run
    out = tmp_path / "run"
    first = Trainer(fast_config(), out).run(max_steps=3)
    assert (first.step, first.complete) == (3, False)
    assert (out / "checkpoints" / "step-0000003" / "train_state.pt").is_file()
    second = Trainer(fast_config(), out, resume=True).run()
    assert (second.step, second.steps_this_run, second.complete) == (6, 3, True)

    expected, got = gate_tensors(full_dir), gate_tensors(out)
    assert expected.keys() == got.keys()
    for name in expected:  # bit for bit: same data order, noise, optimizer and schedule state
        assert torch.equal(expected[name], got[name]), name
    halfway = load_file(str(out / "checkpoints" / "step-0000003" / "gates.safetensors"))
    assert any(not torch.equal(halfway[k], got[k]) for k in got)  # it really trained on
    assert second.loss_last == full.loss_last


def test_resume_refuses_changed_settings(full_run):
    _, _, full_dir, _ = full_run
    with pytest.raises(UserError, match=r"optim\.lr: 0\.001 -> 0\.002"):
        Trainer(fast_config("optim.lr=2e-3"), full_dir, resume=True)
    with pytest.raises(UserError, match="already holds a training run"):
        Trainer(fast_config(), full_dir)


def test_backbone_unchanged_and_only_gates_optimised(full_run):
    from maskattn_deploy.models import load_pipeline

    trainer, result, _, initial = full_run
    assert result.complete and result.step == 6
    fresh = load_pipeline("tiny")
    for name, trained, reference in (
        ("unet", trainer.unet, fresh.unet),
        ("vae", trainer.vae, fresh.vae),
        ("text_encoder", trainer.text.encoders[0], fresh.text_encoder),
        ("text_encoder_2", trainer.text.encoders[1], fresh.text_encoder_2),
    ):
        ref = reference.state_dict()
        for key, value in trained.state_dict().items():
            assert torch.equal(value, ref[key]), f"{name}.{key} changed"
        assert not any(p.requires_grad for p in trained.parameters()), name
    optimised = [p for group in trainer.optimizer.param_groups for p in group["params"]]
    gate_params = list(trainer.gates.parameters())
    assert len(optimised) == len(gate_params)
    assert {id(p) for p in optimised} == {id(p) for p in gate_params}
    assert all(p.dtype == torch.float32 for p in gate_params)
    changed = [k for k, v in trainer.gates.state_dict().items() if not torch.equal(v, initial[k])]
    assert changed  # the gates did move


def test_run_folder_contents(full_run):
    _, result, out, _ = full_run
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in lines if "loss" in r and "event" not in r]
    assert [r["step"] for r in steps] == [2, 4, 6]
    assert all(set(r) >= {"loss", "lr", "open", "images_per_s", "grad_norm"} for r in steps)
    assert "mid" in steps[0]["open"]
    sidecar = json.loads((out / "gates" / "gates.json").read_text())
    meta = sidecar["metadata"]
    assert (sidecar["step"], meta["steps"], meta["complete"]) == (6, 6, True)
    assert meta["recipe"] == "tiny-synthetic" and meta["data"] == "synthetic:10"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps_per_s"] > 0 and summary["gates_dir"] == str(out / "gates")
    assert result.eval_loss_start is not None and result.eval_loss_end is not None


@pytest.mark.parametrize("cache", ["off", "latents"])
def test_bad_records_are_skipped_counted_and_reported(tmp_path, cache):
    data = tmp_path / "data"
    data.mkdir()
    source = SyntheticSource(6, size=48)
    rows = []
    for i in range(6):
        source.image(i).save(data / f"img{i}.png")
        rows.append({"image": f"img{i}.png", "caption": source.caption(i)})
    (data / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated garbage")
    rows += [
        {"image": "corrupt.png", "caption": "a red square above a blue circle"},
        {"image": "missing.png", "caption": "a green circle to the left of a red square"},
        {"image": "img0.png", "caption": "   "},
    ]
    manifest = data / "train.jsonl"
    manifest.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    out = tmp_path / "run"
    config = fast_config(
        f"data.spec=manifest:{manifest}",
        "train.steps=3",
        "data.num_workers=2",
        f"data.cache={cache}",
    )
    result = Trainer(config, out).run()  # 12 draws from 6 usable images: every record is visited
    assert result.complete
    expected = {"empty_caption": 1, "missing_image": 1, "unreadable_image": 1}
    assert result.skipped == expected and result.skipped_total == 3
    assert json.loads((out / "summary.json").read_text())["skipped"] == expected
    end = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert end["event"] == "end" and end["skipped"] == expected


def test_cached_latents_and_text_match_live_encoding(tmp_path):
    live = Trainer(fast_config(), tmp_path / "live")
    cached = Trainer(fast_config("data.cache=all"), tmp_path / "cached")
    assert (tmp_path / "cached" / "cache" / "manifest.json").is_file()
    assert cached.vae is None and cached.text is None  # encoders released
    batch_live = live.stream.next_batch(2)
    batch_cached = cached.stream.next_batch(2)
    assert batch_live.keys == batch_cached.keys
    with torch.no_grad():
        a, b = live.micro_loss(batch_live), cached.micro_loss(batch_cached)
    # Same draws from the same generator; only the VAE's batch composition differs (fp32 sums).
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
    result = cached.run()
    assert result.complete and result.skipped_total == 0


def test_time_ids_follow_the_pipeline_convention():
    from maskattn_deploy.models import load_pipeline

    pipe = load_pipeline("tiny")
    _, ours = prepare_image(Image.new("RGB", (300, 200)), 64, 64)
    theirs = pipe._get_add_time_ids(
        ours[:2],
        ours[2:4],
        ours[4:],
        torch.float32,
        text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim,
    )
    assert theirs.tolist() == [[200.0, 300.0, 0.0, 16.0, 64.0, 64.0]] == [list(map(float, ours))]


def test_relaxed_estimator_trains_through_the_recipe_key(tmp_path):
    trainer = Trainer(fast_config("train.steps=2", "train.gate_estimator=relaxed"), tmp_path / "r")
    assert trainer.gate_mode.estimator is Estimator.RELAXED
    before = {k: v.clone() for k, v in trainer.gates.state_dict().items()}
    result = trainer.run()
    assert result.complete and result.step == 2
    after = trainer.gates.state_dict()
    assert any(not torch.equal(after[k], before[k]) for k in after)  # the gates were updated


def test_initial_gates_do_not_depend_on_the_model_cache(tmp_path, monkeypatch):
    """Building the built-in model on first use draws from the global RNG; the run is seeded
    after loading, so a cold and a warm model cache give the same initial gates."""
    monkeypatch.setenv("MASKATTN_DEPLOY_CACHE", str(tmp_path / "cache"))  # cold: builds tiny
    cold = Trainer(fast_config(), tmp_path / "cold").gates.state_dict()
    warm = Trainer(fast_config(), tmp_path / "warm").gates.state_dict()  # loads the cache
    assert cold.keys() == warm.keys()
    assert all(torch.equal(cold[k], warm[k]) for k in cold)


def test_gradient_checkpointing_gives_the_same_gate_gradients(tmp_path):
    """With gradient checkpointing the UNet recomputes blocks during backward; they must take
    the training path again (backward runs inside the run's gate mode), so the gates get the
    gradients of the plain run: equal up to fp32 summation order (without checkpointing each
    shared head's text features are computed once per forward, with it once per layer)."""
    plain = Trainer(fast_config("train.grad_accum=1"), tmp_path / "plain")
    checkpointed = Trainer(
        fast_config("train.grad_accum=1", "train.gradient_checkpointing=true"), tmp_path / "ckpt"
    )
    assert checkpointed.unet.is_gradient_checkpointing
    stats = [plain.train_step(), checkpointed.train_step()]  # the same batch and draws
    assert stats[0]["loss"] == stats[1]["loss"]  # the forward is bit-identical
    ours = dict(checkpointed.gates.named_parameters())
    for name, param in plain.gates.named_parameters():
        assert param.grad is not None and ours[name].grad is not None, name
        torch.testing.assert_close(ours[name].grad, param.grad, rtol=1e-4, atol=1e-7)  # fp32
