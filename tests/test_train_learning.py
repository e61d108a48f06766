"""The full tiny-synthetic recipe: the gates learn (open fractions move) - and what the loss does.

Measured on the built-in tiny model (random but deterministic weights), the denoising loss on the
fixed held-out batch is almost flat in the gates: at 128 px the initial random gates, all gates
open and all gates closed (argmax fallback only) give 1.08749, 1.08783 and 1.08817, i.e. under
0.1 % apart, because a random UNet's prediction does not depend on the text in a way that
correlates with the noise target. A 300-step fit of the tiny UNet to the synthetic set made it
ignore the text entirely (all gate settings within 3e-6). So the acceptance criterion "the
held-out loss drops measurably" needs a backbone that uses its text conditioning; on the tiny
model that test is kept as a strict xfail that documents the gap (it turns into a failure, to be
promoted to a real test, as soon as the tiny model gets text-sensitive weights).

A text-sensitive tiny backbone is not enough either (measured 2026-11-27, 64 px): the tiny VAE's
random ``quant_conv`` gives a posterior std of ~1.0 against a mean std of ~0.18, so sampled
latents are ~97 % sampling noise; with a deterministic posterior and a 2600-step fit of the whole
tiny UNet (~8.5 min on 2 cores) the backbone does use its text (shuffled captions +4.8 % held-out
loss, all gates closed +3 %). Yet 150 gate steps on it left the held-out loss anywhere from
3.8 % worse to 3.0 % better across seeds and learning rates: with the reference's
straight-through estimator (closed tokens get an additive -1e4, as in the authors'
implementation) a closed token's probability is exactly 0, so its gate receives no gradient and
reopens only through the shared head weights. ``train.gate_estimator = relaxed`` lowered it by
0.18-1.43 % in every seed there; the random-weight tiny model below still cannot show it.
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
    "all-open and all-closed), see the module docstring",
)
def test_recipe_lowers_the_heldout_loss(recipe_run):
    _, result, _ = recipe_run
    assert result.eval_loss_end < result.eval_loss_start * (1 - 0.005)  # 0.5 % margin
