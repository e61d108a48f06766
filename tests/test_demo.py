"""``maskattn-deploy demo`` end to end: CI's proof that the whole job runs on a CPU."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from maskattn_deploy.cli.main import cli


@pytest.mark.slow
def test_demo_writes_images_masks_and_report(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    start = time.perf_counter()
    result = CliRunner().invoke(cli, ["demo", "--out", str(out)])
    seconds = time.perf_counter() - start
    assert result.exit_code == 0, result.output
    # Progress: one line per stage start and end, with the elapsed time.
    for stage in ("train", "export", "generate", "parity", "bench", "report"):
        assert f"] {stage} done in " in result.output and f"] {stage} ..." in result.output
    report = (out / "report.md").read_text()
    summary = json.loads((out / "summary.json").read_text())
    images = [Path(p) for p in summary["images"]]
    masks = [Path(p) for p in summary["mask_grids"]]
    assert len(images) >= 2 and masks
    for path in images + masks:
        assert path.is_file() and path.resolve().is_relative_to(out.resolve())
        with Image.open(path) as image:
            assert image.size[0] >= 128
        assert f"]({path.relative_to(out)})" in report  # linked from the report
    assert "### Parity verdicts" in report
    assert "| unet/out_sample | onnxruntime |" in report and "**Result: PASS**" in report
    assert "UNet step latency" in report and "masked/unmasked" in report
    parity = summary["parity"]
    assert parity["passed"] is True
    # Every exported component and the images were compared with the torch reference.
    compared = {(o["component"], o["output"], o["passed"]) for o in parity["outputs"]}
    assert compared == {
        ("unet", "out_sample", True),
        ("text_encoder", "hidden_states.2", True),  # the penultimate of the tiny CLIPs' 4
        ("text_encoder_2", "hidden_states.2", True),
        ("text_encoder_2", "text_embeds", True),
        ("vae_decoder", "sample", True),
    }
    assert len(parity["gates"]) == 10 and all(g["passed"] for g in parity["gates"])
    (image,) = parity["images"]
    assert image["passed"] and (image["psnr_db"] is None or image["psnr_db"] >= 40)
    bench = summary["bench"]
    assert {p["backend"] for p in bench["pipeline"]} == {"torch", "onnxruntime"}
    assert all(p["images_per_s"] > 0 for p in bench["pipeline"])
    torch_unet = next(u for u in bench["unet"] if u["backend"] == "torch")
    assert torch_unet["masked_over_unmasked"] > 0
    # Time budget: under 5 minutes on 2 CPU cores (a loaded CI machine gets some slack).
    assert seconds < 600, f"demo took {seconds:.0f}s"
