"""Hugging Face Optimum's ``ORTStableDiffusionXLPipeline`` loads our export folders unchanged.

Optimum (optimum-onnx) pins transformers<4.58, which the main install cannot use, so it runs in
a side venv built and cached by tests/_venvs.py with the versions docs/optimum.md names. For each
precision the main venv makes a fresh tiny export; tests/_optimum_side.py then loads it with
``ORTStableDiffusionXLPipeline.from_pretrained(EXPORT_DIR)`` in the side venv, generates one
image and runs Optimum's UNet wrapper on saved inputs. This process compares the image with
``generate --backend onnxruntime`` (same prompt, seed, scheduler and steps) and the UNet output
with a plain ONNX Runtime session on the same inputs.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from _venvs import side_venv
from PIL import Image

pytestmark = pytest.mark.slow

# The versions docs/optimum.md names ("use the export from Optimum"); torch is the CPU build.
OPTIMUM_VERSIONS = {
    "optimum-onnx": "0.1.0",
    "optimum": "2.1.0",
    "transformers": "4.57.6",
    "huggingface_hub": "0.36.2",
    "diffusers": "0.39.0",
    "onnxruntime": "1.32.0",
}
REQUIREMENTS = [
    "torch==2.13.0",
    "optimum-onnx[onnxruntime]==0.1.0",
    *(f"{name}=={v}" for name, v in OPTIMUM_VERSIONS.items() if name != "optimum-onnx"),
]
SIDE_SCRIPT = Path(__file__).with_name("_optimum_side.py")
REQUEST = {
    "prompt": "a red square left of a green circle",
    "negative_prompt": "blue blur",
    "seed": 3,
    "steps": 4,
    "guidance": 5.0,
    "height": 128,
    "width": 128,
}
# uint8 levels: Optimum's pipeline and ours run the same graphs and the same diffusers
# scheduler; what differs is glue (Optimum keeps fp16 latents between steps in fp16 exports).
IMAGE_LEVELS = 2
# Optimum's UNet wrapper vs a plain session: the same graph in the same ONNX Runtime version,
# so only input handling (dtype casts, the [1] timestep broadcast in the graph) could differ.
UNET_RELATIVE = 1e-5


@pytest.fixture(scope="module")
def optimum_python() -> Path:
    return side_venv("optimum", REQUIREMENTS)


@pytest.fixture(scope="module", params=["fp32", "fp16"])
def export_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh tiny export as ``maskattn-deploy export [--fp16]`` writes it (seeded gates).

    Validation is skipped: it only reads the graphs back (the files are the same either way).
    """
    from maskattn_deploy.export import export_pipeline

    out = tmp_path_factory.mktemp(request.param) / "tiny-onnx"
    export_pipeline("tiny", None, out, fp16=request.param == "fp16", validate=False)
    return out


def precision(export_dir: Path) -> str:
    return json.loads((export_dir / "manifest.json").read_text())["precision"]


def unet_inputs(export_dir: Path) -> dict[str, np.ndarray]:
    """One guided step's UNet inputs: batch 2, a 0-d timestep as diffusers passes it."""
    from maskattn_deploy.parity.inputs import ModelDims, ShapeCase, make_feed

    config = json.loads((export_dir / "unet" / "config.json").read_text())
    feed = make_feed("unet", ShapeCase(2, 128, 128), ModelDims.from_unet_config(config), seed=7)
    arrays = {name: value.numpy() for name, value in feed.items()}
    arrays["timestep"] = np.array(arrays["timestep"][0], dtype=np.float32)
    return arrays


@pytest.fixture(scope="module")
def optimum_run(
    export_dir: Path, optimum_python: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict:
    """Run tests/_optimum_side.py on the export; its outputs plus the UNet inputs it used."""
    work = tmp_path_factory.mktemp("optimum-run")
    inputs = unet_inputs(export_dir)
    np.savez(work / "unet_inputs.npz", **inputs)
    request = {
        **REQUEST,
        "export_dir": str(export_dir),
        "out": str(work / "result.npz"),
        "unet_inputs": str(work / "unet_inputs.npz"),
    }
    (work / "request.json").write_text(json.dumps(request))
    proc = subprocess.run(
        [str(optimum_python), str(SIDE_SCRIPT), str(work / "request.json")],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=work,  # not the checkout: nothing there may shadow the side venv's packages
    )
    if proc.returncode != 0:
        pytest.fail(f"Optimum's pipeline failed on {export_dir}:\n{proc.stderr[-6000:]}")
    with np.load(work / "result.npz") as data:
        result = {name: data[name] for name in data.files}
    return {**result, "versions": json.loads(str(result["versions"])), "inputs": inputs}


def test_runs_with_the_documented_versions(optimum_run: dict) -> None:
    assert optimum_run["versions"] == OPTIMUM_VERSIONS


def test_transformers_4_reads_our_tokenizer_files(export_dir: Path, optimum_run: dict) -> None:
    """Optimum's transformers 4.x tokenizers (vocab.json + merges.txt) give our ids."""
    from maskattn_deploy.runtime.model_info import ModelInfo

    info = ModelInfo.from_export(export_dir)
    for name, tokenizer in (("tokenizer", info.tokenizer), ("tokenizer_2", info.tokenizer_2)):
        expected = tokenizer(REQUEST["prompt"], padding="max_length", max_length=77).input_ids
        assert optimum_run[f"{name}_ids"].tolist() == expected


def test_optimum_image_matches_generate(
    export_dir: Path, optimum_run: dict, tmp_path: Path
) -> None:
    from maskattn_deploy.runtime.api import GenerateOptions, run_generate

    request = {k: v for k, v in REQUEST.items() if k != "negative_prompt"}
    ours = run_generate(
        GenerateOptions(
            negative_prompt=REQUEST["negative_prompt"],
            backend="onnxruntime",
            export_dir=export_dir,
            scheduler="euler",  # the export's own scheduler, which Optimum's pipeline loads
            ort_provider="cpu",
            out=tmp_path,
            progress=False,
            **request,
        ),
        say=lambda _: None,
    )
    image = np.asarray(Image.open(ours.images[0]).convert("RGB")).astype(np.int16)
    theirs = optimum_run["image"].astype(np.int16)
    latents = torch.from_numpy(optimum_run["latents"])
    print(
        f"{precision(export_dir)}: image max |diff| {np.abs(image - theirs).max()} levels, "
        f"latents max |diff| {(latents - ours.result.latents).abs().max():.2e}"
    )
    assert image.shape == theirs.shape == (REQUEST["height"], REQUEST["width"], 3)
    assert np.abs(image - theirs).max() <= IMAGE_LEVELS


def test_optimum_unet_matches_a_plain_session(export_dir: Path, optimum_run: dict) -> None:
    import onnxruntime as ort

    session = ort.InferenceSession(
        str(export_dir / "unet" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    dtypes = {i.name: i.type for i in session.get_inputs()}
    inputs = optimum_run["inputs"]
    batch = inputs["sample"].shape[0]
    feed = {
        name: value.astype(np.float16 if dtypes[name] == "tensor(float16)" else value.dtype)
        for name, value in inputs.items()
    }
    feed["timestep"] = np.full((batch,), inputs["timestep"], dtype=np.float32)  # one per row
    ref = session.run(["out_sample"], feed)[0].astype(np.float32)
    got = optimum_run["unet_out"]
    relative = float(np.abs(got - ref).max() / np.abs(ref).max())
    print(f"{precision(export_dir)}: Optimum UNet vs plain session, relative {relative:.1e}")
    assert got.shape == ref.shape
    assert relative <= UNET_RELATIVE
