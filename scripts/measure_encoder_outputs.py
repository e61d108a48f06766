"""What Optimum's text-encoder layout costs ONNX Runtime: every hidden state as an output.

Builds a text encoder with SDXL's first CLIP's shape (CLIP ViT-L/14 text tower: 12 layers,
width 768, random weights, so no download) and exports it twice with the dynamo exporter:

- ``penultimate``: one output, the penultimate hidden state SDXL conditions on;
- ``optimum``: ``last_hidden_state`` then ``hidden_states.0..12``, the layout Optimum's SDXL
  pipeline reads (the export's layout).

It then times ONNX Runtime CPU sessions on the same ids (median of ``--repeats`` runs, the
three taking turns, each timed run right after an untimed one of the same session): the
penultimate graph, the Optimum graph fetching every output, and the Optimum graph fetching
only the penultimate state (what maskattn-deploy's runtime reads). TensorRT needs no
measurement here: its engine keeps only the outputs the runtime reads marked, and the layers
behind unmarked outputs are removed as dead code.

    python scripts/measure_encoder_outputs.py [--repeats 30] [--batch 2] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

LAYERS = 12


class Penultimate(torch.nn.Module):
    def __init__(self, encoder: torch.nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.encoder(input_ids, output_hidden_states=True).hidden_states[-2]


class AllStates(Penultimate):
    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.encoder(input_ids, output_hidden_states=True)
        return (out.last_hidden_state, *out.hidden_states)


def clip_l() -> torch.nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    config = CLIPTextConfig(
        hidden_size=768, intermediate_size=3072, num_attention_heads=12,
        num_hidden_layers=LAYERS, max_position_embeddings=77, hidden_act="quick_gelu",
    )  # fmt: skip
    return CLIPTextModel(config).eval()


def export(module: torch.nn.Module, names: list[str], path: Path) -> None:
    ids = torch.randint(0, 49406, (2, 77))
    torch.onnx.export(
        module, (ids,), str(path), dynamo=True, input_names=["input_ids"], output_names=names,
        dynamic_shapes={"input_ids": {0: torch.export.Dim("B")}}, verbose=False,
    )  # fmt: skip


def interleaved_ms(rows: list, feed: dict, repeats: int) -> list[float]:
    """Median ms of each (session, fetch) row; the rows take turns so load drifts hit all."""
    for _, session, fetch in rows:
        session.run(fetch, feed)
    times: list[list[float]] = [[] for _ in rows]
    for _ in range(repeats):
        for samples, (_, session, fetch) in zip(times, rows, strict=True):
            session.run(fetch, feed)  # settle: this session's threads are now the warm ones
            start = time.perf_counter()
            session.run(fetch, feed)
            samples.append((time.perf_counter() - start) * 1e3)
    return [statistics.median(samples) for samples in times]


def main() -> None:
    import onnxruntime as ort

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    encoder = clip_l()
    all_names = ["last_hidden_state", *(f"hidden_states.{i}" for i in range(LAYERS + 1))]
    penultimate = f"hidden_states.{LAYERS - 1}"
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"penultimate": Path(tmp) / "p.onnx", "optimum": Path(tmp) / "o.onnx"}
        export(Penultimate(encoder).eval(), ["hidden_states"], paths["penultimate"])
        export(AllStates(encoder).eval(), all_names, paths["optimum"])
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        sessions = {
            k: ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"])
            for k, p in paths.items()
        }
        feed = {"input_ids": np.random.default_rng(0).integers(0, 49406, (args.batch, 77))}
        a = sessions["penultimate"].run(None, feed)[0]
        b = sessions["optimum"].run([penultimate], feed)[0]
        print(f"same penultimate state: max |diff| {np.abs(a - b).max():.1e}")
        rows = [
            ("penultimate graph", sessions["penultimate"], None),
            ("Optimum graph, all 14 outputs", sessions["optimum"], None),
            ("Optimum graph, penultimate only", sessions["optimum"], [penultimate]),
        ]
        medians = interleaved_ms(rows, feed, args.repeats)
        print(f"CLIP-L text encoder, batch {args.batch}, 77 tokens, {args.threads} threads:")
        for (label, _, _), ms in zip(rows, medians, strict=True):
            print(f"  {label:<34} {ms:8.2f} ms  ({ms / medians[0]:.3f}x)")


if __name__ == "__main__":
    main()
