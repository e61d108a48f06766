"""Parity and bench on a real tiny fp32 export: passes as exported, fails on a broken weight or
gate, and the bench reports masked/unmasked for torch and ONNX Runtime.

One UNet export (per-layer outputs, one gate head per layer so one gate can be broken alone) is
made for the module and shared by every test here, since an export is the expensive part;
each failure test breaks a copy of it by editing an initializer of the ONNX file, exactly what
a wrong weight or a mis-exported gate would look like. The full pipeline (every component and
the images) is checked by the demo test.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from _gates import write_distinct_gates
from click.testing import CliRunner
from onnx import numpy_helper

from maskattn_deploy.cli.main import cli

# The module's export takes over a minute on 2 cores; every test here builds on it.
pytestmark = pytest.mark.slow

BROKEN_LAYER = "up_blocks.0.attentions.1.transformer_blocks.0.attn2"  # 7th of 10 in order


@pytest.fixture(scope="module")
def gates_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Seeded untrained gates with distinct biases (see ``_gates.write_distinct_gates``)."""
    return write_distinct_gates(tmp_path_factory.mktemp("gates"))


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory: pytest.TempPathFactory, gates_dir: Path) -> Path:
    """The tiny gated UNet alone (fp32, per-layer outputs); parity is its validation."""
    from maskattn_deploy.export import export_unet
    from maskattn_deploy.gating.checkpoint import load_gates
    from maskattn_deploy.models import load_pipeline

    unet = load_pipeline("tiny").unet
    load_gates(gates_dir, unet)
    out = tmp_path_factory.mktemp("export") / "tiny-unet-fp32"
    export_unet(
        unet, out, recipe="tiny", per_layer=True, validate=False, source="tiny",
        gates_checkpoint=gates_dir,
    )  # fmt: skip
    return out


def _parity(args: list[str]) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["parity", *args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


def _copy(export_dir: Path, tmp_path: Path) -> Path:
    target = tmp_path / "broken"
    shutil.copytree(export_dir, target)
    return target


def _edit_initializer(onnx_path: Path, pick, change) -> str:
    """Apply ``change`` to the first initializer ``pick`` selects; returns its name.

    The manifest then records the edited file's hash and size, as an exporter with this bug
    would have written it (a file changed after the export is refused when the folder is
    opened, before parity could compare anything).
    """
    model = onnx.load(str(onnx_path), load_external_data=True)
    for init in model.graph.initializer:
        array = numpy_helper.to_array(init)
        if pick(init.name, array):
            init.CopyFrom(numpy_helper.from_array(change(array.copy()), init.name))
            onnx.save(model, str(onnx_path))
            _record(onnx_path)
            return init.name
    raise AssertionError(f"no initializer matched in {onnx_path}")


def _record(path: Path) -> None:
    folder = path.parent.parent
    manifest = json.loads((folder / "manifest.json").read_text())
    rel = path.relative_to(folder).as_posix()
    manifest["files"][rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    if rel in manifest.get("file_sizes", {}):
        manifest["file_sizes"][rel] = path.stat().st_size
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_tiny_fp32_unet_passes_with_gate_agreement(export_dir: Path, tmp_path: Path) -> None:
    json_path, report = tmp_path / "parity.json", tmp_path / "parity.md"
    code, output = _parity([str(export_dir), "--json", str(json_path), "--report", str(report)])
    assert code == 0, output
    data = json.loads(json_path.read_text())
    assert data["passed"] is True and data["components"] == ["unet"]
    status = {b["name"]: b for b in data["backends"]}
    assert status["torch"]["status"] == "reference"
    assert status["onnxruntime"]["status"] == "ran"
    if status["tensorrt"]["status"] == "skipped":  # never counted as passed
        assert "TensorRT" in status["tensorrt"]["reason"]
        assert any(x.startswith("SKIPPED") and "tensorrt" in x for x in output.splitlines())
    (verdict,) = data["outputs"]
    assert (verdict["component"], verdict["output"], verdict["passed"]) == (
        "unet",
        "out_sample",
        True,
    )
    # One line per output with its verdict, like Polygraphy's comparator.
    assert output.count("PASS    unet/out_sample [onnxruntime vs torch") == 1
    gates = data["gates"]
    assert len(gates) == 10 and all(g["intolerable"] == 0 for g in gates)
    assert data["localisation"][0]["first_bad_layer"] is None
    assert "end-to-end run skipped" in data["images_note"]  # a UNet-only export
    text = report.read_text()
    assert "## Parity verdicts" in text and "| unet/out_sample | onnxruntime |" in text


def test_perturbed_weight_fails_and_names_component_and_output(
    export_dir: Path, tmp_path: Path
) -> None:
    broken = _copy(export_dir, tmp_path)

    def pick(name: str, array: np.ndarray) -> bool:
        return name.endswith("conv_out.weight")

    def change(array: np.ndarray) -> np.ndarray:
        array[0, 0, 1, 1] += 0.5  # one weight of the last convolution
        return array

    name = _edit_initializer(broken / "unet" / "model.onnx", pick, change)
    assert "conv_out" in name
    code, output = _parity([str(broken), "--backends", "onnxruntime", "--no-e2e"])
    assert code == 1, output
    fails = [line for line in output.splitlines() if line.startswith("FAIL")]
    assert any("unet/out_sample [onnxruntime" in line for line in fails), output
    summary = next(line for line in output.splitlines() if line.startswith("FAIL: "))
    assert "unet/out_sample" in summary
    # The broken weight comes after every gated layer: their gates and probabilities still
    # agree, which is how the report tells "UNet output" defects from gate defects.
    assert all(
        line.startswith("PASS") for line in output.splitlines() if line[8:].startswith("gates ")
    )
    assert "all 10 gated layers within tolerance" in output


def test_flipped_gate_names_the_layer(export_dir: Path, tmp_path: Path) -> None:
    broken = _copy(export_dir, tmp_path)
    head = BROKEN_LAYER.replace(".", "_")

    def pick(name: str, array: np.ndarray) -> bool:
        return head in name and array.ndim == 0  # that layer's gate bias (beta), a scalar

    # +50 on beta opens every gate of the layer: about half its entries flip, all far from 0.
    name = _edit_initializer(broken / "unet" / "model.onnx", pick, lambda a: a + np.float32(50.0))
    assert head in name
    json_path = tmp_path / "flip.json"
    code, output = _parity(
        [
            str(broken),
            "--backends",
            "onnxruntime",
            "--per-layer",
            "--no-e2e",
            "--json",
            str(json_path),
        ]
    )
    assert code == 1, output
    data = json.loads(json_path.read_text())
    gates = data["gates"]
    first_failed = next(g for g in gates if not g["passed"])
    assert first_failed["layer"] == BROKEN_LAYER
    assert first_failed["intolerable"] > 0 and first_failed["where"]
    assert all(g["passed"] for g in gates[: [g["layer"] for g in gates].index(BROKEN_LAYER)])
    assert data["localisation"][0]["first_bad_layer"] == BROKEN_LAYER
    assert f"first layer beyond tolerance is {BROKEN_LAYER}" in output
    assert any(
        line.startswith("FAIL") and f"gates {BROKEN_LAYER}" in line for line in output.splitlines()
    )


def test_bench_reports_masked_unmasked_ratio_for_torch_and_onnxruntime(
    export_dir: Path, tmp_path: Path
) -> None:
    json_path, report = tmp_path / "bench.json", tmp_path / "bench.md"
    args = ["bench", str(export_dir), "--backends", "torch,onnxruntime,tensorrt"]
    args += ["--repeats", "3", "--warmup", "1", "--no-e2e", "--threads", "2"]
    args += ["--json", str(json_path), "--report", str(report)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    data = json.loads(json_path.read_text())
    unet = {u["backend"]: u for u in data["unet"]}
    assert set(unet) == {"torch", "onnxruntime"}
    for entry in unet.values():
        masked, plain = entry["masked"], entry["unmasked"]
        assert masked["repeats"] == plain["repeats"] == 3
        assert 0 < masked["min_ms"] <= masked["median_ms"] <= masked["max_ms"]
        # The ratio is the median of the interleaved per-pair ratios, recomputed here.
        pairs = sorted(
            a / b for a, b in zip(masked["samples_ms"], plain["samples_ms"], strict=True)
        )
        assert entry["masked_over_unmasked"] == pytest.approx(pairs[1])
        assert entry["masked_over_unmasked_cpu_time"] > 0
    assert "onnxruntime" in unet["onnxruntime"]["runner"]
    if data["backends"]["tensorrt"].startswith("skipped"):
        assert "TensorRT" in data["backends"]["tensorrt"]
    assert data["memory"]["onnxruntime"]["rss_peak_mib"] > 0
    names = {t["name"] for t in data["targets"]}
    assert {
        "onnxruntime / torch eager UNet step (2x256x256)",
        "torch masked/unmasked UNet step (2x256x256)",
        "onnxruntime masked/unmasked UNet step (2x256x256)",
    } <= names
    text = report.read_text()
    assert "## UNet step latency" in text and "| onnxruntime | 2x256x256 |" in text
    assert "masked/unmasked" in result.output
