"""``generate --backend torch --compile``: the gated UNet through torch.compile.

Dynamo traces the gated UNet once, as one graph (a graph break in a gated layer would split
every step into pieces and hand them back to eager Python), and the compiled pipeline makes the
same image as the eager one. A counting backend stands in for inductor here: it keeps dynamo's
capture (what can break) and runs the captured graph as is, so the test takes seconds instead of
inductor's minutes of C++ compilation on a CPU.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from maskattn_deploy.runtime.api import compile_notes
from maskattn_deploy.runtime.model_info import ModelInfo
from maskattn_deploy.runtime.pipeline import GenerateConfig, Pipeline
from maskattn_deploy.runtime.torch_backend import torch_backend

CONFIG = GenerateConfig("a red cube left of a blue ball", steps=2, seed=3, height=64, width=64)


@pytest.fixture(scope="module")
def gated_pipe():
    from maskattn_deploy.gating.checkpoint import load_gates
    from maskattn_deploy.models import load_pipeline
    from maskattn_deploy.models.tiny import tiny_default_gates_dir

    pipe = load_pipeline("tiny")
    load_gates(tiny_default_gates_dir(), pipe.unet)
    return pipe


def test_compiled_gated_unet_is_one_graph_and_the_same_image(gated_pipe) -> None:
    torch._dynamo.reset()
    graphs: list[torch.fx.GraphModule] = []

    def counting(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        graphs.append(gm)
        return gm.forward

    info = ModelInfo.from_pipe(gated_pipe, "tiny", None)
    eager = Pipeline(torch_backend(gated_pipe), info).generate(CONFIG, progress=False)
    backend = torch_backend(gated_pipe, compile_mode="default", compile_backend=counting)
    compiled = Pipeline(backend, info).generate(CONFIG, progress=False)

    assert len(graphs) == 1, f"graph breaks: dynamo captured {len(graphs)} graphs"
    targets = {str(n.target) for n in graphs[0].graph.nodes}
    # On the CPU the gated layers run the reference path: the open set's argmax fallback and
    # the masking are in the captured graph, not left to eager Python between pieces.
    assert {"argmax", "masked_fill_"} <= targets, "the gated layers are inside the graph"
    # Same ATen ops in the same order on the CPU: the latents agree to fp32 rounding.
    np.testing.assert_allclose(compiled.latents, eager.latents, rtol=0, atol=1e-5)
    assert np.array_equal(np.asarray(compiled.images[0]), np.asarray(eager.images[0]))
    notes = compile_notes(backend, warmed_up=False)
    assert len(notes) == 1 and "first unet call took" in notes[0]
    assert backend.runners["unet"].warmup_s > 0
    assert "torch.compile default" in backend.runners["unet"].describe()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--backend", "onnxruntime", "--compile"], "--compile needs --backend torch"),
        (["--backend", "torch", "--compile", "max-autotune-typo"], "--compile"),
    ],
)
def test_compile_flag_refusals(tmp_path, args: list[str], expected: str) -> None:
    cli = [sys.executable, "-m", "maskattn_deploy.cli.main", "generate", "a cube"]
    proc = subprocess.run(
        [*cli, "--out", str(tmp_path / "out"), *args], capture_output=True, text=True
    )
    err = proc.stderr.strip()
    assert proc.returncode == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("error:") and expected in err
    assert not (tmp_path / "out").exists()
