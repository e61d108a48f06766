"""Engine building logic that runs without TensorRT, and the TensorRT tests that need it.

Offline: optimization profiles from the recipes, engine-manifest refusals, build planning on a
fake export folder, and the fail-fast CLI. The ``tensorrt``-marked tests at the bottom really
build and run engines; they skip with the reason on machines without TensorRT and a GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from _trt import requires_tensorrt
from onnx import TensorProto, helper

from maskattn_deploy.bench.sdxl_config import sdxl_unet_config
from maskattn_deploy.engine.builder import BuildOptions
from maskattn_deploy.engine.cuda_check import missing_for_tensorrt
from maskattn_deploy.engine.manifest import (
    ENGINE_FORMAT,
    EngineManifest,
    EngineMismatchError,
    check_engine_manifest,
    current_environment,
    driver_ptx_isa,
    make_engine_manifest,
    read_engine_manifest,
    write_engine_manifest,
)
from maskattn_deploy.engine.profiles import component_profiles, spec_profiles
from maskattn_deploy.errors import UserError
from maskattn_deploy.export.component_spec import ModelDims, component_spec
from maskattn_deploy.export.folder import ExportFolder
from maskattn_deploy.export.recipe import ExportRecipe
from maskattn_deploy.ops.contract import PLUGIN_NAME, PLUGIN_NAMESPACE
from maskattn_deploy.recipes import load_recipe

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- profiles

SDXL_DIMS = ModelDims.from_unet_config(sdxl_unet_config())  # widths 2048 (text) and 1280 (pooled)


def sdxl_profiles(recipe: dict, component: str) -> list:
    return spec_profiles(recipe, component_spec(component, SDXL_DIMS))


def test_sdxl_profiles_static_1024_and_dynamic_768_1024() -> None:
    recipe = load_recipe("export", "sdxl-1024")
    static, dynamic = sdxl_profiles(recipe, "unet")
    assert (static.name, dynamic.name) == ("static-1024", "dynamic-768-1024")
    sample = static.shapes["sample"]
    assert sample.min == sample.opt == sample.max == (2, 4, 128, 128)  # 1024 px / 8
    d = dynamic.shapes["sample"]
    assert (d.min, d.opt, d.max) == ((2, 4, 96, 96), (2, 4, 128, 128), (4, 4, 128, 128))
    ehs = dynamic.shapes["encoder_hidden_states"]
    assert (ehs.min, ehs.max) == ((2, 77, 2048), (4, 77, 2048))
    assert dynamic.shapes["time_ids"].max == (4, 6)
    # One timestep broadcast in the graph (what the runtime feeds) up to one per row.
    assert (dynamic.shapes["timestep"].min, dynamic.shapes["timestep"].opt) == ((1,), (1,))
    assert dynamic.shapes["timestep"].max == (4,)


def test_tiny_profiles_with_widths_from_the_manifest() -> None:
    recipe = load_recipe("export", "tiny")
    inputs = [
        {"name": "sample", "dtype": "float32", "shape": ["B", 4, "H", "W"]},
        {"name": "timestep", "dtype": "float32", "shape": ["B"]},
        {"name": "encoder_hidden_states", "dtype": "float32", "shape": ["B", "T", 64]},
        {"name": "text_embeds", "dtype": "float32", "shape": ["B", 32]},
        {"name": "time_ids", "dtype": "float32", "shape": ["B", 6]},
    ]
    static, dynamic = component_profiles(recipe, "unet", inputs)
    assert static.shapes["sample"].opt == (2, 4, 32, 32)  # 256 px / 8
    assert dynamic.shapes["sample"].min == (1, 4, 16, 16) and dynamic.shapes["sample"].max == (
        4,
        4,
        48,
        48,
    )
    assert dynamic.shapes["encoder_hidden_states"].opt == (2, 77, 64)
    assert dynamic.shapes["text_embeds"].max == (4, 32)
    # This manifest ties the timestep to the batch (exports before graph revision 3).
    timestep, sample = dynamic.shapes["timestep"], dynamic.shapes["sample"]
    assert (timestep.min[0], timestep.max[0]) == (sample.min[0], sample.max[0])


def test_vae_and_text_encoder_profiles() -> None:
    recipe = load_recipe("export", "sdxl-1024")
    vae = sdxl_profiles(recipe, "vae_decoder")[1].shapes["latent_sample"]
    assert (vae.min, vae.max) == ((1, 4, 96, 96), (4, 4, 128, 128))  # images, not CFG rows
    enc = sdxl_profiles(recipe, "vae_encoder")[0].shapes["sample"]
    assert enc.opt == (1, 3, 1024, 1024)
    ids = sdxl_profiles(recipe, "text_encoder")[0].shapes["input_ids"]
    assert ids.min == ids.max == (2, 77)


def test_static_export_dims_must_match_the_profile() -> None:
    recipe = load_recipe("export", "sdxl-1024")
    inputs = [{"name": "latent_sample", "dtype": "float16", "shape": ["B", 4, 128, 128]}]
    with pytest.raises(UserError, match="fixes axis h to 128"):
        component_profiles(recipe, "vae_decoder", inputs)  # dynamic 768-1024 profile
    only_static = {**recipe, "profiles": [recipe["profiles"][0]]}
    assert component_profiles(only_static, "vae_decoder", inputs)[0].shapes[
        "latent_sample"
    ].max == (2, 4, 128, 128)


def test_bad_recipe_profiles_are_refused() -> None:
    recipe = load_recipe("export", "sdxl-1024")
    odd = {**recipe, "profiles": [{"name": "odd", "batch": 1, "height": 1000, "width": 1024}]}
    with pytest.raises(UserError, match="multiples of 64"):
        ExportRecipe.from_mapping(odd)
    inv = {**recipe, "profiles": [{"name": "inv", "batch": [4, 2, 1], "height": 1024}]}
    with pytest.raises(UserError, match="min <= opt <= max"):
        ExportRecipe.from_mapping(inv)


# ---------------------------------------------------------------- engine manifests

HERE = current_environment("10.13.3.9", "NVIDIA H100 80GB HBM3", (9, 0), (12, 9))
KERNEL = {"id": "maskattn::MaskedSoftmax", "version": "1", "triton_version": "3.6.0",
          "block_t": 128, "tiling": [4, 1, 1], "tiling_source": "default", "ptx_isa": 87}  # fmt: skip


def _manifest(**over) -> EngineManifest:
    base = make_engine_manifest(
        "unet", HERE, "unet/model.onnx", "a" * 64, [], KERNEL, 12.0, {"workspace_gib": 4},
    )  # fmt: skip
    return replace(base, **over)


def test_matching_engine_is_accepted(tmp_path: Path) -> None:
    check_engine_manifest(_manifest(), HERE, onnx_sha256="a" * 64)
    assert _manifest().format == ENGINE_FORMAT
    write_engine_manifest(tmp_path / "unet.engine", _manifest())  # the JSON round trip is exact
    assert read_engine_manifest(tmp_path / "unet.engine") == _manifest()
    data = json.loads((tmp_path / "unet.json").read_text())
    assert data["onnx"] == {"path": "unet/model.onnx", "sha256": "a" * 64}
    assert data["cuda_driver"] == "12.9" and data["plugin"] == KERNEL
    del data["gpu_name"]
    (tmp_path / "unet.json").write_text(json.dumps(data))
    with pytest.raises(EngineMismatchError, match="lacks 'gpu_name'; rebuild"):
        read_engine_manifest(tmp_path / "unet.engine")


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ({"tensorrt_version": "11.4.0.106"}, "TensorRT 11.4.0.106"),
        (
            {"compute_capability": "8.0", "gpu_name": "NVIDIA A100-SXM4-80GB"},
            "compute capability 8.0",
        ),
        ({"gpu_name": "NVIDIA H100 PCIe"}, "GPU NVIDIA H100 PCIe"),
    ],
)
def test_engine_for_other_machine_is_refused(override: dict, needle: str) -> None:
    with pytest.raises(EngineMismatchError) as info:
        check_engine_manifest(_manifest(**override), HERE, export_dir="out/sdxl-onnx")
    message = str(info.value)
    assert needle in message
    assert "rebuild with maskattn-deploy build out/sdxl-onnx" in message


@pytest.mark.parametrize(
    ("driver", "ok"), [((12, 9), True), ((13, 0), True), ((12, 8), True), ((12, 6), False)]
)
def test_plugin_kernel_needs_a_driver_that_can_jit_its_ptx(driver, ok) -> None:
    # The kernel is PTX ISA 8.7: drivers 12.8+ JIT it (NVIDIA's table: 12.8 -> 8.7, 12.6 -> 8.5).
    here = current_environment("10.13.3.9", "NVIDIA H100 80GB HBM3", (9, 0), driver)
    if ok:
        check_engine_manifest(_manifest(), here)
    else:
        with pytest.raises(EngineMismatchError, match=r"PTX ISA 8\.7.*driver 12\.6"):
            check_engine_manifest(_manifest(), here)


@pytest.mark.parametrize(
    ("driver", "isa"),
    [("12.4", 84), ("12.5", 85), ("12.6", 85), ("12.7", 86), ("12.8", 87), ("12.9", 88),
     ("13.0", 90), ("13.1", 91), ("0.0", None), ("", None)],
)  # fmt: skip
def test_driver_ptx_isa_follows_nvidias_table(driver: str, isa: int | None) -> None:
    assert driver_ptx_isa(driver) == isa


def test_engines_without_a_kernel_record_are_refused() -> None:
    # Format 1 engines were built with a kernel whose PTX declared two extra parameters.
    old = _manifest(
        format="maskattn-deploy-engine/1", plugin={"id": "maskattn::MaskedSoftmax", "version": "1"}
    )
    with pytest.raises(EngineMismatchError, match="kernel is not recorded.*rebuild"):
        check_engine_manifest(old, HERE)
    no_plugin = _manifest(plugin=None)  # components without the custom node need no kernel
    check_engine_manifest(no_plugin, HERE)


def test_engine_from_other_onnx_is_refused() -> None:
    with pytest.raises(
        EngineMismatchError, match=r"another ONNX file.*rebuild with maskattn-deploy build"
    ):
        check_engine_manifest(_manifest(), HERE, onnx_sha256="b" * 64)


def test_missing_engine_manifest_asks_for_rebuild(tmp_path: Path) -> None:
    (tmp_path / "unet.engine").write_bytes(b"\0")
    with pytest.raises(EngineMismatchError, match="rebuild with maskattn-deploy build"):
        read_engine_manifest(tmp_path / "unet.engine")


# ---------------------------------------------------------------- build planning (no TensorRT)


def _masked_softmax_onnx(path: Path, t: int = 77, dtype: int = TensorProto.FLOAT) -> None:
    """A one-node graph with the custom node as the exporter writes it for TensorRT."""
    node = helper.make_node(
        PLUGIN_NAME, ["S", "G"], ["P"], domain=PLUGIN_NAMESPACE,
        plugin_namespace=PLUGIN_NAMESPACE, aot=1, threshold=0.0,
    )  # fmt: skip
    graph = helper.make_graph(
        [node], "masked_softmax",
        [helper.make_tensor_value_info("S", dtype, ["B", 2, 1024, t]),
         helper.make_tensor_value_info("G", TensorProto.FLOAT, ["B", 1, 1024, t])],
        [helper.make_tensor_value_info("P", dtype, ["B", 2, 1024, t])],
    )  # fmt: skip
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(PLUGIN_NAMESPACE, 1)]
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))


def _fake_export(root: Path, outputs: list[str] | None = None) -> Path:
    """An export folder with one small 'unet' ONNX holding the plugin node."""
    _masked_softmax_onnx(root / "unet" / "model.onnx")
    recipe = load_recipe("export", "tiny")
    manifest = {  # a version-1 manifest: the reader migrates it
        "format": "maskattn-deploy-export/1", "precision": "fp32", "opset": 18, "recipe": recipe,
        "shapes": recipe["shapes"], "model": {"spec": None, "unet_fingerprint": None},
        "components": {"unet": {"path": "unet/model.onnx", "precision": "fp32", "inputs": [
            {"name": "S", "dtype": "float32", "shape": ["B", 2, 1024, 77]},
            {"name": "G", "dtype": "float32", "shape": ["B", 1, 1024, 77]}],
            "outputs": [{"name": n, "dtype": "float32", "shape": ["B", 2, 1024, 77]}
                        for n in outputs or ["P"]]}},
        "files": {},
    }  # fmt: skip
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def test_plan_builds_on_a_fake_export(tmp_path: Path) -> None:
    from maskattn_deploy.engine.builder import plan_builds
    from maskattn_deploy.export.recipe import resolve_recipe

    export = _fake_export(tmp_path / "exp")
    manifest = ExportFolder.open(export).manifest
    recipe = resolve_recipe(None, manifest.recipe)
    (job,) = plan_builds(export, manifest, recipe)
    assert job.engine_path == export / "engines" / "unet.engine"
    assert job.timing_cache == export / "engines" / "timing.cache"
    assert job.workspace_bytes == 2 << 30 and job.opt_level == 3  # tiny.toml [engine]
    assert job.uses_plugin
    assert len(job.onnx_sha256) == 64
    dyn = job.profiles[1].shapes["S"]  # tiny dynamic-128-384: batch 1-2-4, other dims static
    assert (dyn.min, dyn.opt, dyn.max) == ((1, 2, 1024, 77), (2, 2, 1024, 77), (4, 2, 1024, 77))
    assert (
        job.custom_nodes == {PLUGIN_NAME: 1} and job.outputs is None
    )  # every output kept by default
    options = BuildOptions(workspace_gib=0.5, opt_level=5, timing_cache=tmp_path / "tc")
    (job2,) = plan_builds(export, manifest, recipe, options)
    assert (job2.workspace_bytes, job2.opt_level, job2.timing_cache) == (
        1 << 29,
        5,
        tmp_path / "tc",
    )
    with pytest.raises(UserError, match="unknown component"):
        plan_builds(export, manifest, recipe, BuildOptions(components=["vae_decoder"]))


def test_plan_keeps_only_the_outputs_asked_for(tmp_path: Path) -> None:
    from maskattn_deploy.engine.builder import plan_builds
    from maskattn_deploy.export.recipe import resolve_recipe

    export = _fake_export(tmp_path / "exp", outputs=["P", "P_debug"])
    manifest = ExportFolder.open(export).manifest
    recipe = resolve_recipe(None, manifest.recipe)
    (job,) = plan_builds(export, manifest, recipe, BuildOptions(outputs={"unet": ["P"]}))
    assert job.outputs == ("P",) and job.options["outputs"] == ["P"]
    with pytest.raises(UserError, match="must be some of P, P_debug, got hidden"):
        plan_builds(export, manifest, recipe, BuildOptions(outputs={"unet": ["hidden"]}))
    with pytest.raises(UserError, match="unknown component"):
        plan_builds(export, manifest, recipe, BuildOptions(outputs={"text_encoder": ["x"]}))


def test_text_encoder_engines_keep_what_the_runtime_reads(tmp_path: Path) -> None:
    from maskattn_deploy.engine.builder import plan_builds
    from maskattn_deploy.export.recipe import resolve_recipe

    export = _fake_export(tmp_path / "exp")
    states = [f"hidden_states.{i}" for i in range(4)]  # Optimum's layout, 3 layers
    node = helper.make_node("Identity", ["input_ids"], ["x"])
    graph = helper.make_graph(
        [node, *[helper.make_node("Identity", ["x"], [n]) for n in ["last_hidden_state", *states]]],
        "enc", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["B", 77])],
        [helper.make_tensor_value_info(n, TensorProto.INT64, ["B", 77]) for n in ["last_hidden_state", *states]],
    )  # fmt: skip
    (export / "text_encoder").mkdir()
    onnx.save(helper.make_model(graph), str(export / "text_encoder" / "model.onnx"))
    manifest = json.loads((export / "manifest.json").read_text())
    manifest["components"]["text_encoder"] = {
        "path": "text_encoder/model.onnx",
        "precision": "fp32",
        "inputs": [{"name": "input_ids", "dtype": "int64", "shape": ["B", 77]}],
        "outputs": [{"name": n, "dtype": "float32", "shape": ["B", 77, 64]}
                    for n in ["last_hidden_state", *states]],
    }  # fmt: skip
    (export / "manifest.json").write_text(json.dumps(manifest))
    manifest = ExportFolder.open(export).manifest
    jobs = {
        j.component: j for j in plan_builds(export, manifest, resolve_recipe(None, manifest.recipe))
    }
    assert jobs["text_encoder"].outputs == ("hidden_states.2",)  # the penultimate state only
    assert jobs["unet"].outputs is None  # other components keep every output
    options = BuildOptions(outputs={"text_encoder": ["last_hidden_state", "hidden_states.2"]})
    jobs = {
        j.component: j
        for j in plan_builds(export, manifest, resolve_recipe(None, manifest.recipe), options)
    }
    assert jobs["text_encoder"].outputs == ("last_hidden_state", "hidden_states.2")


# ---------------------------------------------------------------- network checks (no TensorRT)


def test_every_custom_node_must_become_a_plugin_layer(tmp_path: Path) -> None:
    from maskattn_deploy.engine.network import check_plugin_layers, custom_node_counts
    from maskattn_deploy.errors import ExportError

    _masked_softmax_onnx(tmp_path / "m.onnx")
    assert custom_node_counts(tmp_path / "m.onnx") == {PLUGIN_NAME: 1}
    check_plugin_layers({PLUGIN_NAME: 1}, {PLUGIN_NAME: 1}, tmp_path / "m.onnx")
    # The parser imported a node through its ONNX function: same numbers, no kernel.
    with pytest.raises(
        ExportError, match=r"made 0 maskattn::MaskedSoftmax .* from the 1 .*fell back"
    ):
        check_plugin_layers({}, {PLUGIN_NAME: 1}, tmp_path / "m.onnx")
    # Each node type needs its own plugin: layers of another plugin do not count.
    with pytest.raises(ExportError, match="MaskedCrossAttention"):
        check_plugin_layers({PLUGIN_NAME: 1}, {PLUGIN_NAME: 1, "MaskedCrossAttention": 2}, tmp_path)


def test_kernel_record_names_triton_tiling_and_ptx_isa() -> None:
    import triton
    from maskattn_deploy.plugins.trt_plugin import ptx_version_for_driver

    from maskattn_deploy.engine.builder import kernel_record
    from maskattn_deploy.engine.cuda_check import CudaStatus

    cuda = CudaStatus(1, "GPU", (9, 0), (12, 9))
    record = kernel_record(None, 77, cuda)
    assert record["triton_version"] == triton.__version__
    assert (record["block_t"], record["tiling"], record["tiling_source"]) == (
        128,
        [4, 1, 1],
        "default",
    )
    assert record["ptx_isa"] == ptx_version_for_driver((12, 9), 90) <= 88  # driver 12.9 -> 8.8
    explicit = kernel_record((8, 2, 1), 77, cuda)
    assert (explicit["tiling"], explicit["tiling_source"]) == ([8, 2, 1], "explicit")


def test_the_plugin_keeps_the_tiling_it_was_defined_with(monkeypatch) -> None:
    from maskattn_deploy.plugins import trt_plugin
    from maskattn_deploy.plugins.masked_softmax_triton import Tiling

    # As after a first register_plugin((4, 1, 1)) in this process (TensorRT's registry is global).
    monkeypatch.setitem(trt_plugin._registered, "tiling", Tiling(4, 1, 1))
    assert trt_plugin.register_plugin((4, 1, 1)) is True
    with pytest.raises(UserError, match=r"already defined .* tiling \(8, 2, 1\) in a new process"):
        trt_plugin.register_plugin((8, 2, 1))
    with pytest.raises(UserError, match="kernel tiling"):
        trt_plugin.register_plugin((3, 1, 1))


class _TimingCacheConfig:
    """Stands in for the two IBuilderConfig calls whose results use_timing_cache acts on: a
    cache made from ``refused`` bytes is rejected (False), corrupt bytes give no cache (None)."""

    def __init__(self, refused: bytes) -> None:
        self.refused, self.attached = refused, None

    def create_timing_cache(self, data: bytes) -> object | None:
        return None if data == b"corrupt" else ("cache", data)

    def set_timing_cache(self, cache: object, ignore_mismatch: bool) -> bool:
        assert ignore_mismatch is False  # a foreign cache must be noticed, not half-used
        if cache[1] == self.refused:
            return False
        self.attached = cache
        return True


@pytest.mark.parametrize("data", [b"from another GPU", b"corrupt"])
def test_a_refused_timing_cache_is_replaced_by_an_empty_one(
    data: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    from maskattn_deploy.engine.network import use_timing_cache

    config = _TimingCacheConfig(refused=b"from another GPU")
    with caplog.at_level("WARNING"):
        use_timing_cache(config, data, Path("engines/timing.cache"))
    assert config.attached == ("cache", b"")
    assert "refused the timing cache engines/timing.cache" in caplog.text
    caplog.clear()
    good = _TimingCacheConfig(refused=b"from another GPU")
    use_timing_cache(good, b"ours", Path("t"))
    assert good.attached == ("cache", b"ours") and not caplog.text


# ---------------------------------------------------------------- fail fast without TensorRT

needs_no_trt = pytest.mark.skipif(
    missing_for_tensorrt() is None, reason="TensorRT and a GPU are present here"
)


@needs_no_trt
def test_build_cli_fails_fast_with_one_line(tmp_path: Path) -> None:
    export = _fake_export(tmp_path / "exp")
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "maskattn_deploy.cli.main", "build", str(export), "--recipe", "tiny"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    elapsed = time.perf_counter() - start
    assert proc.returncode == 2
    assert elapsed < 5.0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert lines[0].startswith("error: ") and "TensorRT" in lines[0] and "pip install" in lines[0]
    assert not (export / "engines").exists()


@needs_no_trt
def test_export_hook_skips_with_the_reason(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from maskattn_deploy.engine.builder import maybe_build_after_export

    export = _fake_export(tmp_path / "exp")
    with caplog.at_level("WARNING"):
        assert maybe_build_after_export(export, "tiny", no_engine=False) is None
        assert maybe_build_after_export(export, "tiny", no_engine=True) is None
    text = caplog.text
    assert (
        "TensorRT" in text and f"maskattn-deploy build {export}" in text and "--no-engine" in text
    )


# ---------------------------------------------------------------- needs TensorRT + GPU


@pytest.mark.tensorrt
@requires_tensorrt
@pytest.mark.parametrize("dtype", [TensorProto.FLOAT, TensorProto.FLOAT16])
def test_plugin_engine_matches_reference(tmp_path: Path, dtype: int) -> None:
    from maskattn_deploy.engine.builder import build_engines
    from maskattn_deploy.engine.runner import TrtRunner
    from maskattn_deploy.ops.reference import masked_softmax_reference

    export = _fake_export(tmp_path / "exp")
    _masked_softmax_onnx(export / "unet" / "model.onnx", dtype=dtype)
    (engine,) = build_engines(export, recipe="tiny")
    gen = torch.Generator().manual_seed(0)
    torch_dtype = torch.float32 if dtype == TensorProto.FLOAT else torch.float16
    S = (torch.randn(2, 2, 1024, 77, generator=gen) * 3).to(torch_dtype)
    G = torch.randn(2, 1, 1024, 77, generator=gen) - 0.5
    G[:, :, :7] = -5.0  # some all-closed rows
    with TrtRunner(engine, export_dir=export) as runner:
        got = runner.run({"S": S, "G": G})["P"].cpu()
    want = masked_softmax_reference(S, G)
    # Same tolerances as the kernel's interpreter tests (fp32 summation order / fp16 rounding).
    torch.testing.assert_close(
        got.float(), want.float(), atol=1e-6 if dtype == TensorProto.FLOAT else 2e-3, rtol=0
    )
    assert torch.equal(got == 0, want == 0)


@pytest.mark.tensorrt
@requires_tensorrt
def test_tiny_export_engine_matches_onnxruntime(tmp_path: Path) -> None:
    """Build the tiny export's UNet engine and compare it with ONNX Runtime on the same feed."""
    export = os.environ.get("MASKATTN_TINY_EXPORT")
    if not export:
        pytest.skip(
            "set MASKATTN_TINY_EXPORT to a tiny export folder (maskattn-deploy export --recipe tiny)"
        )
    import onnxruntime as ort

    from maskattn_deploy.engine.builder import build_engines
    from maskattn_deploy.engine.runner import TrtRunner

    export_dir = Path(export)
    manifest = json.loads((export_dir / "manifest.json").read_text())
    unet = manifest["components"]["unet"]
    opt = component_profiles(manifest["recipe"], "unet", unet["inputs"])[0]
    rng = np.random.default_rng(0)
    feed = {
        spec["name"]: rng.standard_normal(opt.shapes[spec["name"]].opt).astype(spec["dtype"])
        for spec in unet["inputs"]
    }
    options = BuildOptions(components=["unet"], out=tmp_path / "engines")
    (engine,) = build_engines(export_dir, options=options)
    with TrtRunner(engine, export_dir=export_dir) as runner:
        got = runner.run(feed)
    session = ort.InferenceSession(
        str(export_dir / unet["path"]), providers=["CPUExecutionProvider"]
    )
    want = session.run(None, feed)
    for name, ref in zip([o["name"] for o in unet["outputs"]], want, strict=True):
        # fp16 engines vs fp32-accumulating ONNX Runtime CPU: loose, relative to the output scale.
        scale = float(np.abs(ref).max()) + 1e-6
        assert float(np.abs(got[name].float().cpu().numpy() - ref).max()) / scale < 2e-2, name


def _trt_network(onnx_path: Path):
    """(trt, network) parsed from ``onnx_path`` with the plugin registered."""
    import tensorrt as trt
    from maskattn_deploy.plugins.trt_plugin import register_plugin

    from maskattn_deploy.engine.builder import network_flags

    register_plugin()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    assert parser.parse_from_file(str(onnx_path)), [
        str(parser.get_error(i)) for i in range(parser.num_errors)
    ]
    return trt, network, (builder, parser)


@pytest.mark.tensorrt
@requires_tensorrt
def test_parsed_custom_nodes_are_plugin_layers(tmp_path: Path) -> None:
    from maskattn_deploy.engine.network import check_plugin_layers, plugin_layer_counts
    from maskattn_deploy.errors import ExportError
    from maskattn_deploy.export.onnx_op import make_function

    _masked_softmax_onnx(tmp_path / "plugin.onnx")
    trt, network, _keep = _trt_network(tmp_path / "plugin.onnx")
    assert plugin_layer_counts(trt, network) == {PLUGIN_NAME: 1}
    # Without plugin_namespace the parser takes the model-local function: no plugin layer.
    model = onnx.load(str(tmp_path / "plugin.onnx"))
    node = model.graph.node[0]
    kept = [a for a in node.attribute if a.name != "plugin_namespace"]
    del node.attribute[:]
    node.attribute.extend(kept)
    model.functions.append(make_function(18))
    onnx.save(model, str(tmp_path / "function.onnx"))
    trt, network, _keep = _trt_network(tmp_path / "function.onnx")
    assert plugin_layer_counts(trt, network) == {}
    with pytest.raises(ExportError, match="fell back"):
        check_plugin_layers(plugin_layer_counts(trt, network), {PLUGIN_NAME: 1}, tmp_path)


@pytest.mark.tensorrt
@requires_tensorrt
def test_runner_waits_for_inputs_made_on_the_callers_stream(tmp_path: Path) -> None:
    """Inputs written by a busy stream must not be copied before they are written."""
    from maskattn_deploy.engine.builder import build_engines
    from maskattn_deploy.engine.runner import TrtRunner
    from maskattn_deploy.ops.reference import masked_softmax_reference

    export = _fake_export(tmp_path / "exp")
    (engine,) = build_engines(export, recipe="tiny")
    gen = torch.Generator().manual_seed(1)
    S_host = torch.randn(2, 2, 1024, 77, generator=gen) * 3
    G_host = torch.randn(2, 1, 1024, 77, generator=gen)
    want = masked_softmax_reference(S_host, G_host)
    producer = torch.cuda.Stream()
    S = torch.zeros(S_host.shape, device="cuda")  # stale contents a racing copy would read
    G = torch.zeros(G_host.shape, device="cuda")
    torch.cuda.synchronize()
    with TrtRunner(engine, export_dir=export) as runner, torch.cuda.stream(producer):
        torch.cuda._sleep(200_000_000)  # keeps the producer busy for a while (~0.1 s)
        S.copy_(S_host.cuda(non_blocking=False))
        G.copy_(G_host.cuda(non_blocking=False))
        out = runner.run({"S": S, "G": G})["P"]
        got = (out * 1).cpu()  # used on the producer's stream right away, no host sync
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)  # fp32 kernel tolerance


@pytest.mark.tensorrt
@requires_tensorrt
def test_one_engine_serves_every_profile(tmp_path: Path, monkeypatch) -> None:
    """Two profiles used: the engine is deserialized once, each profile has its context."""
    import maskattn_deploy.engine.builder as builder
    from maskattn_deploy.ops.reference import masked_softmax_reference
    from maskattn_deploy.runtime.trt_backend import TrtComponentRunner

    export = _fake_export(tmp_path / "exp")
    (engine,) = builder.build_engines(export, recipe="tiny")
    loads = []
    real = builder.load_engine_checked
    monkeypatch.setattr(builder, "load_engine_checked", lambda *a: loads.append(a) or real(*a))
    runner = TrtComponentRunner("unet", engine, export)
    runner.input_names = ["S", "G"]  # the fake export's "unet" is one masked-softmax node
    runner.activate()
    try:
        for batch in (2, 4, 2):  # static profile (batch 2), dynamic one (batch 4), back
            S = torch.randn(batch, 2, 1024, 77) * 3
            G = torch.randn(batch, 1, 1024, 77)
            got = runner.infer({"S": S, "G": G})["P"].cpu()
            torch.testing.assert_close(got, masked_softmax_reference(S, G), atol=1e-6, rtol=0)
        assert len(loads) == 1
        assert sorted(runner._runner._profiles) == [0, 1]
    finally:
        runner.deactivate()


@pytest.mark.tensorrt
@requires_tensorrt
def test_engine_keeps_only_the_outputs_asked_for(tmp_path: Path, caplog) -> None:
    import tensorrt as trt

    from maskattn_deploy.engine.builder import build_engines, load_engine_checked

    export = _fake_export(tmp_path / "exp", outputs=["P", "P_copy"])
    model = onnx.load(str(export / "unet" / "model.onnx"))
    model.graph.node.append(helper.make_node("Identity", ["P"], ["P_copy"]))
    model.graph.output.append(helper.make_tensor_value_info("P_copy", TensorProto.FLOAT, None))
    onnx.save(model, str(export / "unet" / "model.onnx"))
    (export / "engines").mkdir()
    (export / "engines" / "timing.cache").write_bytes(b"not a timing cache")
    with caplog.at_level("WARNING"):
        (engine,) = build_engines(export, "tiny", BuildOptions(outputs={"unet": ["P"]}))
    assert "refused the timing cache" in caplog.text
    loaded = load_engine_checked(engine, export)
    names = [loaded.engine.get_tensor_name(i) for i in range(loaded.engine.num_io_tensors)]
    outputs = [n for n in names if loaded.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
    assert outputs == ["P"]
    assert loaded.manifest.plugin["tiling_source"] == "default"
