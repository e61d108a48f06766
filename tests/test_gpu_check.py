"""The GPU validation run: its CPU dry run, the full-size SDXL builder and the time budget.

The dry run executes the same code as the GPU run at tiny sizes (Triton interpreter in a child
process, tiny UNet, perf_counter); CI runs it here so the script a lent GPU runs does not rot.
The SDXL UNet is instantiated on the meta device: the real architecture, no memory.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from maskattn_deploy.bench import gpu_check
from maskattn_deploy.bench.gpu_check.attention import ATOL as ATTENTION_ATOL
from maskattn_deploy.bench.gpu_check.context import RunContext
from maskattn_deploy.bench.gpu_check.kernel import ATOL, load_kernel
from maskattn_deploy.bench.gpu_check.model import unet_inputs, unet_step_module
from maskattn_deploy.bench.gpu_check.profile import PROFILED
from maskattn_deploy.bench.gpu_check.variants import VARIANT_BY_NAME, variant_skip
from maskattn_deploy.bench.sdxl_config import (
    SDXL_UNET_PARAMETERS,
    build_sdxl_unet,
    count_parameters,
    sdxl_unet_config,
)
from maskattn_deploy.cli.main import cli

# Every case of docs/design.md section 3.3, as named by gpu_check.kernel.kernel_cases.
CONTRACT_CASES = {
    "random-t1", "random-t2", "random-t77", "random-t154", "random-t231", "all-open",
    "all-closed-fallback", "one-open-token", "ties-in-gate", "threshold-0.3", "near-fp16-range",
    "gate-dtype-of-logits", "rows-7", "rows-odd-t154", "non-finite-logits",
}  # fmt: skip


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[object, dict, Path]:
    out = tmp_path_factory.mktemp("gpu-check") / "dry"
    result = CliRunner().invoke(cli, ["selftest", "--dry-run", "--out", str(out)])
    results = json.loads((out / "results.json").read_text())
    return result, results, out


@pytest.mark.slow
def test_dry_run_writes_every_part(dry_run) -> None:
    result, results, out = dry_run
    assert result.exit_code == 0, result.output[-3000:]
    assert results["schema"] == gpu_check.SCHEMA == "maskattn-gpu-check-v2"
    assert results["dry_run"] is True and results["complete"] is True
    assert results["verdict"]["ok"] is True, results["verdict"]
    assert set(results["parts"]) == set(gpu_check.PARTS)
    for name, part in results["parts"].items():
        assert part["status"] == "ok", (name, part)
        assert part["elapsed_s"] >= 0
    env = results["parts"]["environment"]
    assert env["device"] == "cpu" and env["versions"]["torch"] == torch.__version__
    assert env["triton_interpret"] is True  # the kernel really ran in the interpreter child
    markdown = (out / "results.md").read_text()
    for heading in ("# MaskAttn GPU check: dry run", "## Verdict", "## Masked-softmax kernel",
                    "## Fused gated attention vs SDPA", "## Gate head precision",
                    "## UNet step", "## Tuning"):  # fmt: skip
        assert heading in markdown
    assert "[tuning] ok" in result.output and "== summary ==" in result.output
    # Every target has a row; on the dry run none is judged, each was measured.
    targets = results["verdict"]["targets"]
    assert set(targets) == {"kernel_copy_fraction", "unet_graph", "unet_compile",
                            "unet_compile_ro", "attention_triton", "attention_flex",
                            "gate_head_flips"}  # fmt: skip
    for name, target in targets.items():
        assert target["met"] is None and target["measured"] is not None, (name, target)


@pytest.mark.slow
def test_dry_run_kernel_correctness_all_pass(dry_run) -> None:
    _, results, _ = dry_run
    kernel = results["parts"]["kernel"]
    corr = kernel["correctness"]
    assert corr["all_pass"] is True and corr["failed"] == []
    assert {c["case"] for c in corr["cases"]} == CONTRACT_CASES
    assert corr["n_cases"] == 2 * len(CONTRACT_CASES)  # every case in fp32 and fp16
    for case in corr["cases"]:
        assert all(case["checks"].values()), case
        assert case["max_abs_diff"] <= ATOL[case["dtype"]]
    for row in kernel["timing"]:
        b, h, n, t = row["shape"]
        elem = 2 if row["dtype"] == "float16" else 4
        # B = S read + G (fp32) read + P write, the same bytes the copy baseline moves.
        assert row["bytes"] == 2 * b * h * n * t * elem + b * n * t * 4
        for impl in ("kernel", "copy", "reference"):
            assert row[impl]["median_us"] > 0 and row[impl]["min_us"] <= row[impl]["median_us"]
            assert row[impl]["method"] == "perf_counter"
        assert row["fraction_of_copy"] == pytest.approx(
            row["copy"]["median_us"] / row["kernel"]["median_us"]
        )
    assert {r["dtype"] for r in kernel["timing"]} == {"float16", "float32"}
    [bound] = kernel["boundness"]  # one shape, timed in both dtypes
    half, full = sorted(kernel["timing"], key=lambda r: r["dtype"])
    assert bound["dtype_time_ratio"] == pytest.approx(
        full["kernel"]["median_us"] / half["kernel"]["median_us"]
    )
    assert bound["bytes_ratio"] == pytest.approx(full["bytes"] / half["bytes"])


@pytest.mark.slow
def test_dry_run_tuning_sweeps_both_kernels_and_reports_resources(dry_run) -> None:
    _, results, _ = dry_run
    tuning = results["parts"]["tuning"]
    sweep = tuning["masked_softmax"]
    assert sweep["status"] == "ok" and len(sweep["candidates"]) == 2  # the dry plan's two
    assert all(c["correct"] and c["geomean_us"] > 0 for c in sweep["candidates"])
    fastest = min(sweep["candidates"], key=lambda c: c["geomean_us"])
    assert sweep["chosen"] == [fastest["rows"], fastest["num_warps"], fastest["heads"]]
    copy = {f"{r['shape']} {r['dtype']}": r["copy"]["median_us"]
            for r in results["parts"]["kernel"]["timing"]}  # fmt: skip
    for key, fraction in sweep["chosen_fraction_of_copy"].items():
        assert fraction == pytest.approx(copy[key] / fastest["median_us"][key])
    attention = tuning["gated_attention"]
    assert attention["status"] == "ok" and len(attention["candidates"]) == 2
    assert all(c["correct"] for c in attention["candidates"])
    # ptxas -v on sm_90 for the swept tilings of both kernels (compiled, no GPU needed).
    kinds = [r["kernel"] for r in tuning["resources"]]
    assert kinds == ["masked_softmax"] * 2 + ["gated_attention"] * 2
    for r in tuning["resources"]:
        assert r["arch"] == 90 and r["registers"] > 0 and r["programs_per_sm"] >= 1


@pytest.mark.slow
def test_dry_run_attention_matches_reference_and_times_against_sdpa(dry_run) -> None:
    _, results, _ = dry_run
    shapes = results["parts"]["attention"]["shapes"]
    assert [s["shape"] for s in shapes] == [list(x) for x in gpu_check.DRY_PLAN.attention_shapes]
    for s in shapes:
        assert set(s["impls"]) == {"sdpa", "triton", "flex"}
        sdpa = s["impls"]["sdpa"]["median_us"]
        for impl in ("triton", "flex"):
            r = s["impls"][impl]
            assert r["status"] == "ok" and r["correct"] is True, r
            assert r["max_abs_diff"] <= ATTENTION_ATOL["float32"]
            assert r["ratio_vs_sdpa"] == pytest.approx(r["median_us"] / sdpa)
    worst = max(s["impls"]["flex"]["ratio_vs_sdpa"] for s in shapes)
    assert results["verdict"]["targets"]["attention_flex"]["measured"] == pytest.approx(worst)


@pytest.mark.slow
def test_dry_run_counts_gate_flips_of_the_activation_dtype_head(dry_run) -> None:
    _, results, _ = dry_run
    head = results["parts"]["gate_head"]
    flips = head["flips"]
    assert head["layers"] == 10 and flips["dtype"] == "fp16"
    assert len(flips["per_layer"]) == 10 and sum(flips["per_layer"].values()) == flips["flips"]
    assert 0 <= flips["tolerated"] <= flips["flips"] <= flips["entries"]
    # 10 layers x CFG batch 2 x latent tokens x 77 text tokens (tiny mid stage at 8x8 latents)
    assert flips["entries"] % (2 * 77) == 0 and flips["entries"] > 0
    assert results["verdict"]["targets"]["gate_head_flips"]["measured"] == flips["flips"]


@pytest.mark.slow
def test_dry_run_unet_ratios_are_positive(dry_run) -> None:
    _, results, _ = dry_run
    unet = results["parts"]["unet"]
    assert unet["model"] == "tiny" and unet["gated_layers"] == 10  # tiny: 2*2 + 3*2 mid attn2
    assert unet["kernel_path"].startswith("triton interpreter")
    variants = unet["variants"]
    assert set(variants) == set(VARIANT_BY_NAME)
    for name, row in variants.items():
        if name in gpu_check.DRY_PLAN.left_out:
            assert row["status"] == "skipped"
            continue
        assert row["status"] == "ok", row
        assert row["median_ms"] > 0 and row["samples"] >= 2 and row["output_finite"]
        assert row["peak_memory_bytes"] is None  # CUDA only
    expected = {"eager_reference", "eager_sdpa", "eager_op", "eager_fused", "eager_flex",
                "graph_fused", "graph_flex", "compile_fused", "compile_ro_fused"}  # fmt: skip
    assert set(unet["ratios"]) == expected
    for name, ratio in unet["ratios"].items():
        assert math.isfinite(ratio["ratio_median"]) and ratio["ratio_median"] > 0
        assert math.isfinite(ratio["ratio_min"]) and ratio["ratio_min"] > 0
        if name.startswith("eager_"):  # eager is timed without pairs
            assert ratio["ratio_paired"] is None
        else:  # the deployment paths: interleaved pairs with the unmasked twin
            assert math.isfinite(ratio["ratio_paired"]) and ratio["ratio_paired"] > 0
    # Switching between the compiled unmasked and masked steps reuses both compiled graphs.
    for name in ("compile_masked_fused", "compile_ro_masked_fused"):
        assert variants[name]["paired"]["recompiles"] == 0, variants[name]["paired"]
    # No CUDA graphs on the CPU: the graph variants run eagerly and say so; both compile
    # modes ran on the eager backend, which says what mode it could not honour.
    assert variants["graph_masked_fused"]["method"] == "perf_counter"
    assert variants["compile_ro_masked_fused"]["compiled_with"].startswith("eager backend")
    assert "reduce-overhead" in variants["compile_ro_masked_fused"]["compiled_with"]
    targets = results["verdict"]["targets"]
    for path in ("graph", "compile", "compile_ro"):
        best = min(unet["ratios"][f"{path}_{impl}"]["ratio_paired"] for impl in ("fused", "flex")
                   if f"{path}_{impl}" in unet["ratios"])  # fmt: skip
        assert targets[f"unet_{path}"]["measured"] == best
    # Where the time goes: one profiled step each (CPU ops on the dry run), masked has more.
    profile = unet["profile"]
    assert profile["status"] == "ok" and set(profile["variants"]) == set(PROFILED)
    for p in profile["variants"].values():
        assert p["clock"] == "cpu" and p["total_ms"] > 0 and 0 < len(p["kernels"]) <= 25
        times = [r["self_us"] for r in p["kernels"]]
        assert times == sorted(times, reverse=True)
    calls = {n: p["calls"] for n, p in profile["variants"].items()}
    assert calls["eager_masked_fused"] > calls["eager_unmasked"]  # gate heads add ops
    # Same gates, every attention path: fp32 kernels/SDPA/Flex vs the reference op differ by
    # rounding only.
    for path in ("op", "fused", "flex", "sdpa"):
        assert unet["agreement"][f"{path}_vs_reference"]["rel_l2"] < 1e-5, path
    assert 0.0 < unet["variants"]["eager_masked_reference"]["open_fraction"]["mid"] < 1.0


def test_tiny_budget_skips_later_parts(tmp_path: Path) -> None:
    out = tmp_path / "tiny-budget"
    result = CliRunner().invoke(
        cli, ["selftest", "--dry-run", "--budget-s", "0.5", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output[-3000:]
    parts = json.loads((out / "results.json").read_text())["parts"]
    assert parts["environment"]["status"] == "ok"
    for name in ("kernel", "attention", "gate_head", "unet", "tuning"):
        assert parts[name]["status"] == "skipped"
        assert parts[name]["reason"].startswith("budget:"), parts[name]
    assert "| kernel | skipped |" in (out / "results.md").read_text()


def test_budget_reason_names_need_and_remainder() -> None:
    now = [100.0]
    budget = gpu_check.Budget(60.0, clock=lambda: now[0])
    assert budget.skip_reason("kernel", 60.0) is None
    now[0] += 45.0
    assert budget.remaining() == pytest.approx(15.0)
    assert budget.skip_reason("unet", 10.0) is None
    reason = budget.skip_reason("compile", 20.0)
    assert reason == "budget: compile needs ~20 s, 15 s of 60 s left"
    now[0] += 100.0
    assert "0 s of 60 s left" in budget.skip_reason("unet", 1.0)


def test_missing_kernel_module_is_a_skip_reason(monkeypatch) -> None:
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    module, reason = load_kernel(torch.device("cpu"), "maskattn_deploy.plugins.no_such_kernel")
    assert module is None and "is not importable" in reason


def test_gpu_run_without_cuda_names_the_dry_run(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the error is for CPU-only machines")
    from maskattn_deploy.errors import BackendUnavailableError

    result = CliRunner().invoke(cli, ["selftest", "--gpu", "--out", str(tmp_path)])
    assert isinstance(result.exception, BackendUnavailableError)
    assert "--dry-run" in str(result.exception)
    both = CliRunner().invoke(cli, ["selftest", "--gpu", "--dry-run"])
    assert both.exit_code == 2 and "exclude each other" in both.output


def test_sdxl_unet_on_meta_is_the_documented_architecture() -> None:
    from maskattn_deploy.gating import GateConfig, select_layers

    unet = build_sdxl_unet("meta")
    assert all(p.device.type == "meta" for p in unet.parameters())  # nothing allocated
    assert count_parameters(unet) == SDXL_UNET_PARAMETERS  # 2,567,463,684 (published)
    assert round(count_parameters(unet) / 1e9, 2) == 2.57
    assert [type(b).__name__ for b in unet.down_blocks] == [
        "DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"
    ]  # fmt: skip
    assert [type(b).__name__ for b in unet.up_blocks] == [
        "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"
    ]  # fmt: skip
    assert unet.conv_in.in_channels == 4 and unet.conv_in.out_channels == 320
    assert unet.add_embedding.linear_1.in_features == 2816  # 1280 pooled + 6 x 256 ids
    for level, (width, depth) in enumerate([(640, 2), (1280, 10)], start=1):
        transformer = unet.down_blocks[level].attentions[0]
        assert len(transformer.transformer_blocks) == depth
        attn2 = transformer.transformer_blocks[0].attn2
        assert attn2.to_q.in_features == width and attn2.to_k.in_features == 2048
        assert attn2.heads == width // 64  # 64-wide heads: 10 and 20
    assert len(unet.mid_block.attentions[0].transformer_blocks) == 10
    # Default gates (stage mid): every attn2 of down_blocks.2 (2 x 10) and up_blocks.0 (3 x 10).
    layers = select_layers(unet, GateConfig(stage="mid"))
    assert len(layers) == 50
    assert {layer.name.split(".attentions")[0] for layer in layers} == {
        "down_blocks.2", "up_blocks.0"
    }  # fmt: skip
    assert {(layer.latent_dim, layer.text_dim) for layer in layers} == {(1280, 2048)}


def test_sdxl_config_matches_diffusers_conversion_of_the_sgm_config() -> None:
    """diffusers' own LDM->diffusers converter, fed the official sd_xl_base.yaml values."""
    from diffusers.loaders.single_file_utils import create_unet_diffusers_config_from_ldm

    network = {
        "adm_in_channels": 2816, "num_classes": "sequential", "in_channels": 4,
        "out_channels": 4, "model_channels": 320, "attention_resolutions": [4, 2],
        "num_res_blocks": 2, "channel_mult": [1, 2, 4], "num_head_channels": 64,
        "use_linear_in_transformer": True, "transformer_depth": [1, 2, 10], "context_dim": 2048,
    }  # fmt: skip
    original = {
        "model": {
            "params": {
                "network_config": {"params": network},
                "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}},
            }
        }
    }
    converted = create_unet_diffusers_config_from_ldm(original, {}, image_size=1024)
    ours = sdxl_unet_config()
    for key, value in converted.items():
        mine = ours[key]
        assert (list(mine) if isinstance(mine, tuple) else mine) == value, key


@pytest.mark.slow
def test_full_size_cfg_step_runs_on_meta(monkeypatch) -> None:
    """The GPU run's SDXL inputs and gated step, shape-checked on the meta device (no memory)."""
    from maskattn_deploy.gating import GateConfig, install_gates, processor

    unet = build_sdxl_unet("meta", torch.float16)
    inputs = unet_inputs(unet, 128, torch.float16, torch.device("meta"), seed=0)
    seen: list[tuple[tuple[int, ...], tuple[int, ...], torch.dtype]] = []

    def spy(logits, gate_logits, threshold=0.0):
        seen.append((tuple(logits.shape), tuple(gate_logits.shape), logits.dtype))
        return torch.empty_like(logits)

    monkeypatch.setattr(processor, "masked_softmax_op", spy)
    gates = install_gates(unet, GateConfig(stage="mid"))
    with torch.no_grad(), gates.mode(attention="op"):
        out = unet_step_module(unet)(*inputs.values())
    assert out.shape == (2, 4, 128, 128) and out.dtype == torch.float16
    # 50 gated layers at 32x32 tokens, 20 heads: the kernel's second timing shape.
    assert seen == [((2, 20, 1024, 77), (2, 1, 1024, 77), torch.float16)] * 50


def test_compile_variants_need_their_pair_to_fit_the_budget() -> None:
    now = [0.0]
    ctx = RunContext(
        config=gpu_check.CheckConfig(), plan=gpu_check.GPU_PLAN, device=torch.device("cpu"),
        budget=gpu_check.Budget(450.0, clock=lambda: now[0]), recorder=None, timer=None,
        echo=print,
    )  # fmt: skip
    v = VARIANT_BY_NAME
    estimate = gpu_check.GPU_PLAN.estimate_s  # first compile 130 s, later ones 60 s
    now[0] = 450.0 - 189  # 189 s left: the first compile fits, it and its partner (190) do not
    reason = variant_skip(v["compile_unmasked"], ctx, kernel_ok=True)
    assert reason == "budget: compile_unmasked needs ~190 s, 189 s of 450 s left"
    assert variant_skip(v["eager_masked_fused"], ctx, kernel_ok=True) is None
    assert variant_skip(v["compile_masked_fused"], ctx, True) is None  # 130 s fits
    ctx.compiles_s = [140.0]  # the first compile took 140 s: later ones are expected at 60 s
    assert variant_skip(v["compile_ro_unmasked"], ctx, True) is None  # 2 x 60 s fits
    ctx.compiles_s = [140.0, 150.0]  # a later compile took 150 s: the next ~165 s each
    reason = variant_skip(v["compile_ro_unmasked"], ctx, True)
    assert reason == "budget: compile_ro_unmasked needs ~330 s, 189 s of 450 s left"
    ctx.compiles_s = [140.0, 20.0]
    # Extras keep the tuning part's reserve: 60 s + 60 s > 100 s left.
    now[0] = 450.0 - 100
    reserve = estimate["tuning_reserve"]
    reason = variant_skip(v["compile_masked_flex"], ctx, True)
    assert reason == f"budget: compile_masked_flex needs ~{60 + reserve:.0f} s, 100 s of 450 s left"
    assert variant_skip(v["compile_ro_masked_fused"], ctx, True) is None
    ctx.kernel_path = "kernel unavailable: no triton"
    for name in ("eager_masked_fused", "graph_masked_op", "compile_masked_fused"):
        assert variant_skip(v[name], ctx, False) == ctx.kernel_path
    assert variant_skip(v["graph_masked_flex"], ctx, False) is None  # no Triton kernel needed
    ctx.config = gpu_check.CheckConfig(skip_compile=True)
    assert variant_skip(v["compile_masked_op"], ctx, True) == "--skip-compile"


def test_device_script_filters_the_log_and_keeps_the_exit_code(tmp_path: Path) -> None:
    """scripts/device_gpu_check.sh with stand-ins for python3 and nvidia-smi: the check's exit
    code comes back, log.txt drops torch.compile's warnings, log-full.txt keeps everything."""
    import shutil
    import subprocess

    root = Path(__file__).resolve().parent.parent
    (tmp_path / "scripts").mkdir()
    shutil.copy(root / "scripts" / "device_gpu_check.sh", tmp_path / "scripts")
    (tmp_path / ".whl").mkdir()
    (tmp_path / ".whl" / "diffusers-0-py3-none-any.whl").write_text("")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "python3"
    fake.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = "-m" ]; then exit 0; fi\n'  # pip install of the carried wheel
        'echo "args: $*"\n'
        'echo "/x/torch/_dynamo/utils.py:1: UserWarning: Dynamo does not know"\n'
        'echo "  torch._dynamo.utils.warn_once(msg)"\n'
        'echo "W1127 02:44:08.594000 447 torch/_dynamo/convert_frame.py:1743] limit"\n'
        'echo "[unet] ok in 1.0 s"\n'
        "exit 1\n"
    )
    fake.chmod(0o755)
    out = tmp_path / "out"
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "OUT": str(out), "BUDGET_S": "30"}
    proc = subprocess.run(["bash", "scripts/device_gpu_check.sh"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    log, full = (out / "log.txt").read_text(), (out / "log-full.txt").read_text()
    assert "args: scripts/gpu_check.py --gpu --budget-s 30 --out " in log
    assert "[unet] ok in 1.0 s" in log and "Warning" not in log and "warn_once" not in log
    assert "W1127" not in log and "W1127" in full and "UserWarning" in full
    assert (out / "nvidia-smi.txt").is_file()
