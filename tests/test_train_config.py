"""Training recipes, typed overrides and the learning-rate schedule."""

from __future__ import annotations

import math
import re
from importlib import resources

import pytest

from maskattn_deploy.errors import UserError
from maskattn_deploy.recipes import recipe_names
from maskattn_deploy.train.config import (
    apply_overrides,
    config_from_recipe,
    diff_configs,
    load_train_config,
    valid_keys,
)
from maskattn_deploy.train.optim import lr_factor

RECIPES = ("tiny-synthetic", "sdxl-coco-512", "sdxl-coco-1024")


def test_recipes_ship_and_start_with_their_command():
    assert set(RECIPES) <= set(recipe_names("train"))
    for name in RECIPES:
        text = (resources.files("maskattn_deploy.recipes.train") / f"{name}.toml").read_text()
        first = text.splitlines()[0]
        assert first.startswith("# maskattn-deploy train ") and f"--recipe {name} " in first
        load_train_config(name)  # parses and validates


def test_paper_protocol_recipes():
    r512 = load_train_config("sdxl-coco-512")
    assert r512.data.resolution == 512 and r512.train.steps == 100_000
    for world in (1, 2, 8):  # effective batch 16 whatever the GPU count
        assert r512.train.batch_size * r512.grad_accum_for(world) * world == 16
    assert (r512.optim.lr, r512.optim.weight_decay) == (1e-4, 0.01)
    assert (r512.optim.warmup_steps, r512.optim.schedule) == (1000, "cosine")
    assert r512.data.multi_object_only and r512.gates.stage == "mid"

    r1024 = load_train_config("sdxl-coco-1024")
    assert r1024.data.resolution == 1024 and r1024.train.steps == 10_000
    assert r1024.train.batch_size * r1024.grad_accum_for(1) == 8
    assert r1024.gates.init.endswith("sdxl-coco-512/gates")


def test_tiny_recipe_fits_ci():
    tiny = load_train_config("tiny-synthetic")
    assert tiny.model == "tiny" and tiny.data.spec.startswith("synthetic:")
    assert tiny.data.resolution <= 256 and 100 <= tiny.train.steps <= 150
    assert 2 <= tiny.train.batch_size <= 4 and tiny.optim.lr >= 1e-3


def test_overrides_are_typed_by_the_recipe():
    config = load_train_config(
        "tiny-synthetic",
        [
            "train.steps=1e3",
            "lr=3e-4",  # unique bare key
            "log.tensorboard=no",
            "optim.betas=0.8,0.95",
            "data.spec=synthetic:32:9",
            "gates.threshold=-0.5",
        ],
    )
    assert config.train.steps == 1000 and isinstance(config.train.steps, int)
    assert config.optim.lr == 3e-4
    assert config.log.tensorboard is False
    assert config.optim.betas == [0.8, 0.95]
    assert config.data.spec == "synthetic:32:9"
    assert config.gates.threshold == -0.5


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("bogus=1", "unknown training setting 'bogus'; valid keys: name, "),
        ("train.steps=1.5", "bad value '1.5' for train.steps"),
        ("log.progress=maybe", "bad value 'maybe' for log.progress"),
        ("train.steps", "is not key=value"),
        ("train.batch_size=0", "train.batch_size must be an integer >= 1, got 0"),
        ("optim.lr=inf", "optim.lr must be a finite number > 0, got inf"),
        ("optim.lr=nan", "optim.lr must be a finite number > 0, got nan"),
        (
            "train.seed=100000000000000000000000",
            "train.seed must be an integer in 0..1099511627776",
        ),
        ("optim.betas=0.9,1.0", "optim.betas[1] must be a finite number >= 0 and < 1, got 1"),
        ("data.resolution=12", "data.resolution must be a multiple of 8, got 12"),
        ("data.caption_dropout=1.5", "data.caption_dropout must be a finite number in 0..1"),
        ("gates.stage=top", "gates.stage must be one of"),
        ("train.gate_estimator=soft", "train.gate_estimator must be one of bias, relaxed"),
    ],
)
def test_bad_overrides_fail_clearly(override, message):
    with pytest.raises(UserError, match=re.escape(message)):
        load_train_config("tiny-synthetic", [override])


def test_unknown_recipe_key_and_wrong_type_fail():
    with pytest.raises(UserError, match="unknown recipe setting 'train.stepz'"):
        config_from_recipe({"train": {"stepz": 3}})
    with pytest.raises(UserError, match="train.steps = 'many' has the wrong type"):
        config_from_recipe({"train": {"steps": "many"}})
    assert "train.steps" in valid_keys() and "model" in valid_keys()


def test_effective_batch_must_divide():
    config = load_train_config("sdxl-coco-512")
    with pytest.raises(UserError, match="not a multiple"):
        config.grad_accum_for(3)


def test_diff_configs_lists_changes():
    a = load_train_config("tiny-synthetic")
    b = load_train_config("tiny-synthetic")
    apply_overrides(b, ["optim.lr=5e-3", "log.every=3"])
    assert diff_configs(a, b, ignore=("log",)) == ["optim.lr: 0.001 -> 0.005"]


def test_lr_schedule_warmup_then_cosine():
    f = lambda step: lr_factor(step, warmup=4, total=104)  # noqa: E731
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == 1.0
    assert math.isclose(f(54), 0.5, rel_tol=1e-12)  # half way through the cosine
    assert f(104) == 0.0 and f(200) == 0.0
    assert lr_factor(10, 0, 10, "constant") == 1.0
    assert math.isclose(lr_factor(5, 0, 10, "linear", min_ratio=0.1), 0.55)
