"""Gate training on the CPU: the gates learn, and the held-out loss drops where it can.

Two recipes, two backbones:

* ``tiny-synthetic`` (random tiny backbone): the gates really change their decisions (open
  fractions move), but the denoising loss on the fixed held-out batch is flat in the gates. At
  128 px the initial random gates, all gates open and all gates closed (argmax fallback only)
  give 1.08749, 1.08783 and 1.08817, under 0.1 % apart: a random UNet's prediction does not
  depend on the text in a way that correlates with the noise target. That test stays as a strict
  xfail documenting the limit.
* ``tiny-fitted`` (the tiny UNet fitted to use its text, shipped in the package; see
  :mod:`maskattn_deploy.models.tiny_fitted`): 150 gate steps at 64 px on the ``high`` stage with
  the ``relaxed`` estimator lower the held-out loss. Measured on the dev machine (2 threads):
  seed 0 (the recipe's) 1.54 %, seeds 1 and 2 0.36 % and 0.24 %; 300 steps at lr 3e-3 gave
  1.44 / -0.09 / 0.07 %. With the authors' ``bias`` estimator the same backbone gave 3.0 %
  worse to 0.7 % better: a closed token's probability is exactly 0, so its gate gets no
  gradient. The asserted margin (0.1 %) is above anything the gates can do on the random
  backbone and below the smallest drop over three seeds.
"""

from __future__ import annotations

import pytest
import torch

from maskattn_deploy.train.config import load_train_config
from maskattn_deploy.train.loop import Trainer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def recipe_run(tmp_path_factory):
    """The tiny-synthetic recipe as shipped (150 steps, 128 px, batch 4)."""
    out = tmp_path_factory.mktemp("learning") / "run"
    config = load_train_config(
        "tiny-synthetic", ["log.progress=false", "log.checkpoint_every=0", "log.tensorboard=false"]
    )
    trainer = Trainer(config, out)
    initial = {k: v.clone() for k, v in trainer.gates.state_dict().items()}
    result = trainer.run()
    return trainer, result, initial


def test_recipe_trains_the_gates(recipe_run):
    trainer, result, initial = recipe_run
    assert result.complete and result.step == 150 and result.skipped_total == 0
    assert result.eval_loss_start is not None and result.eval_loss_end is not None
    # The gates really change their decisions on the same fixed batch: the open fraction of the
    # mid stage moves by more than 2 points (seeded; 0.311 -> 0.21 with 2 threads, 0.26 with 1:
    # thread count changes fp32 summation order, hence the loose bound).
    moved = abs(result.open_end["mid"] - result.open_start["mid"])
    assert moved > 0.02, (result.open_start, result.open_end)
    final = trainer.gates.state_dict()
    assert any(not torch.equal(final[k], initial[k]) for k in final)
    assert result.steps_per_s > 0


@pytest.mark.xfail(
    strict=True,
    reason="random-weight tiny model: the denoising loss is flat in the gates (<0.1 % between "
    "all-open and all-closed); the tiny-fitted recipe below is the learning check",
)
def test_random_backbone_recipe_lowers_the_heldout_loss(recipe_run):
    _, result, _ = recipe_run
    assert result.eval_loss_end < result.eval_loss_start * (1 - 0.005)  # 0.5 % margin


@pytest.fixture(scope="module")
def fitted_run(tmp_path_factory):
    """The tiny-fitted recipe as shipped (150 steps, 64 px, high stage, relaxed estimator)."""
    out = tmp_path_factory.mktemp("learning-fitted") / "run"
    config = load_train_config(
        "tiny-fitted", ["log.progress=false", "log.checkpoint_every=0", "log.tensorboard=false"]
    )
    assert config.model == "tiny-fitted" and config.train.gate_estimator == "relaxed"
    return Trainer(config, out).run()


def test_fitted_backbone_recipe_lowers_the_heldout_loss(fitted_run):
    result = fitted_run
    assert result.complete and result.step == 150
    # 0.1 % margin on the same held-out batch and noise before and after (see the docstring).
    assert result.eval_loss_end < result.eval_loss_start * (1 - 0.001), (
        result.eval_loss_start, result.eval_loss_end,
    )  # fmt: skip
    # The open fraction of the high stage changes from its initial value.
    assert result.open_end["high"] != pytest.approx(result.open_start["high"], abs=1e-3)
