"""``bench --gate-head``: the gate-head cost before/after and the activation-dtype gate flips."""

from __future__ import annotations

import json

from click.testing import CliRunner

from maskattn_deploy.cli.main import cli


def test_gate_head_bench_prints_pairs_and_counts_flips_on_every_gate(tmp_path) -> None:
    out = tmp_path / "gate_head.json"
    args = ["bench", "--gate-head", "--shapes", "1x64x64", "--repeats", "2", "--warmup", "0"]
    res = CliRunner().invoke(cli, [*args, "--precision", "fp16", "--json", str(out)])
    assert res.exit_code == 0, res.output
    report = json.loads(out.read_text())
    pairs = [(c["what"], c["before"], c["after"]) for c in report["comparisons"]]
    assert pairs == [
        ("heads", "per-layer", "cached"),
        ("unet step", "per-layer", "cached"),
        ("heads", "cached", "activation"),  # only on fp16/bf16 activations
        ("unet step", "cached", "activation"),
    ]
    assert all(
        len(c["a"]["samples_ms"]) == 2 == len(c["b"]["samples_ms"]) for c in report["comparisons"]
    )
    # Every gate of every layer is compared: the tiny model's 10 "mid" layers sit at the
    # 64 px / 8 / 4 = 2x2 latent level (4 tokens), 77 text tokens, batch 1.
    assert report["layers"] == 10 and report["heads"] == 1
    assert [f["dtype"] for f in report["flips"]] == ["fp16", "bf16"]
    for flips in report["flips"]:
        assert flips["entries"] == 10 * 4 * 77 * 1
        assert sum(flips["per_layer"].values()) == flips["flips"] <= flips["entries"]
    assert "after/before" in res.output and "gate flips" in res.output
