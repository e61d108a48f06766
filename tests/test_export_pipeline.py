"""The tiny pipeline exported twice and reused: fp32 through the CLI, fp16 through the API.

fp32 (``maskattn-deploy export --out DIR --per-layer``, seeded tiny gates): manifest contract,
UNet parity at batch 1/2 and two resolutions from one file, per-layer probabilities, custom
nodes vs their inlined function, gate coverage, printed time. fp16 (``export_pipeline(fp16=True,
vae_encoder=True, external_data_threshold=0)``): fp16 outside the fp32 islands, parity within
the fp16 tolerance, VAE kept fp32, external data everywhere.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto

from maskattn_deploy.cli.main import cli
from maskattn_deploy.errors import ExportError
from maskattn_deploy.export.component_spec import COMPONENT_IO
from maskattn_deploy.export.graph import (
    check_gate_coverage,
    fp32_outside_islands,
    gated_layers_in,
    node_scopes,
    standard_softmax_layers,
)
from maskattn_deploy.export.onnx_op import custom_nodes, inline_functions
from maskattn_deploy.export.spec import PER_LAYER_OUTPUT_PREFIX
from maskattn_deploy.utils import sha256_file

pytestmark = pytest.mark.slow

UNET_OUT = "out_sample"
# (batch, height px, width px): batch 1 and 2, two resolutions, all from one file.
POINTS = [(1, 128, 128), (2, 128, 128), (1, 192, 128), (2, 192, 128)]


@pytest.fixture(scope="module")
def fp32_export(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("fp32") / "tiny-onnx"
    result = CliRunner().invoke(cli, ["export", "--out", str(out), "--per-layer"])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert result.exit_code == 0, result.output
    return out, result.output


@pytest.fixture(scope="module")
def fp16_export(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    from maskattn_deploy.export import export_pipeline

    out = tmp_path_factory.mktemp("fp16") / "tiny-onnx-fp16"
    lines: list[str] = []
    export_pipeline(
        "tiny",
        None,
        out,
        fp16=True,
        vae_encoder=True,
        external_data_threshold=0,
        progress=lines.append,
    )
    return out, lines


@pytest.fixture(scope="module")
def gated_unet() -> tuple[torch.nn.Module, object]:
    """A fresh fp32 tiny UNet with the seeded tiny gates: the PyTorch reference."""
    from maskattn_deploy.gating.checkpoint import load_gates
    from maskattn_deploy.models import load_pipeline
    from maskattn_deploy.models.tiny import tiny_default_gates_dir

    unet = load_pipeline("tiny").unet
    gates = load_gates(tiny_default_gates_dir(), unet)
    return unet, gates


def unet_feed(batch: int, height: int, width: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "sample": torch.randn(batch, 4, height // 8, width // 8, generator=gen),
        "timestep": torch.tensor([999.0, 3.0][:batch]),
        "encoder_hidden_states": torch.randn(batch, 77, 64, generator=gen),
        "text_embeds": torch.randn(batch, 32, generator=gen),
        "time_ids": torch.tensor([[height, width, 0.0, 0.0, height, width]] * batch),
    }


def torch_unet(unet: torch.nn.Module, feed: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.inference_mode():
        return unet(
            feed["sample"],
            feed["timestep"],
            feed["encoder_hidden_states"],
            added_cond_kwargs={"text_embeds": feed["text_embeds"], "time_ids": feed["time_ids"]},
        ).sample


def session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def np_feed(feed: dict[str, torch.Tensor], fp16: bool = False) -> dict[str, np.ndarray]:
    keep = {"timestep", "time_ids"}
    return {k: (v.half() if fp16 and k not in keep else v).numpy() for k, v in feed.items()}


# --- fp32, CLI ------------------------------------------------------------------------------


def test_cli_prints_progress_summary_and_time_under_two_minutes(fp32_export) -> None:
    _, output = fp32_export
    for i, name in enumerate(["text_encoder", "text_encoder_2", "unet", "vae_decoder"], 1):
        assert f"[{i}/4] {name}: exporting (fp32)" in output
    assert "seeded, untrained tiny gates" in output  # the default-gates note
    assert re.search(
        r"unet\s+out_sample\s+@ B=2 192x128\s+max abs \S+\s+rel_l2 \S+\s+cos \S+\s+ok", output
    )
    assert re.search(r"^component\s+size\s+opset\s+precision\s+max diff$", output, re.M)
    assert re.search(r"^unet\s+[\d.]+ MiB\s+18\s+fp32\s+\d\.\de-\d\d$", output, re.M)
    match = re.search(r"in ([\d.]+) s \(CPU (\d+) s, (\d+) cores", output)
    assert match, output
    wall, cpu = float(match[1]), int(match[2])
    print(f"tiny fp32 export: {wall:.1f} s wall, {cpu} s CPU")
    # The exporter is single-threaded Python: CPU seconds are the wall time of an idle
    # 2-core machine (this one is shared, so its wall clock is not the measure).
    assert cpu < 120


def test_manifest_contract_and_hashes(fp32_export) -> None:
    from maskattn_deploy.gating.checkpoint import read_checkpoint
    from maskattn_deploy.models.tiny import build_tiny_unet, tiny_default_gates_dir

    out, _ = fp32_export
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "maskattn-deploy-export/2"
    assert (manifest["precision"], manifest["opset"]) == ("fp32", 18)
    assert manifest["recipe"]["name"] == "tiny" and manifest["recipe"]["profiles"]
    assert list(manifest["components"]) == ["text_encoder", "text_encoder_2", "unet", "vae_decoder"]
    # Optimum's text-encoder layout: the tiny CLIPs have 3 layers, so 4 hidden states.
    states = ["last_hidden_state", *(f"hidden_states.{i}" for i in range(4))]
    outputs = {"text_encoder": states, "text_encoder_2": ["text_embeds", *states],
               "unet": ["out_sample"], "vae_decoder": ["sample"]}  # fmt: skip
    for name, info in manifest["components"].items():
        assert info["path"] == f"{name}/model.onnx" and info["external_data"] is False
        assert [i["name"] for i in info["inputs"]] == list(COMPONENT_IO[name][0])
        names = [o["name"] for o in info["outputs"]]
        assert names[: len(outputs[name])] == outputs[name]  # then probs/<layer> (--per-layer)
    unet = manifest["components"]["unet"]
    assert {i["name"]: i["dtype"] for i in unet["inputs"]} == dict.fromkeys(
        COMPONENT_IO["unet"][0], "float32"
    )
    assert manifest["components"]["text_encoder"]["inputs"][0] == {
        "name": "input_ids",
        "dtype": "int64",
        "shape": ["B", 77],
    }
    timestep = next(i for i in unet["inputs"] if i["name"] == "timestep")
    assert timestep["shape"] == ["S"]  # its own length: [1] is broadcast to the batch
    ckpt = read_checkpoint(tiny_default_gates_dir())
    assert manifest["gates"]["sha256"] == manifest["gate_checkpoint_sha256"] == ckpt.sha256
    assert manifest["gated_layers"] == list(ckpt.layer_to_head)
    from maskattn_deploy.models import unet_fingerprint

    assert manifest["model"]["unet_fingerprint"] == unet_fingerprint(build_tiny_unet())
    assert manifest["model"]["spec"] == "tiny"
    on_disk = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} - {
        "manifest.json"
    }
    assert set(manifest["files"]) == on_disk
    for rel, digest in manifest["files"].items():
        assert sha256_file(out / rel) == digest
    assert all(c["ok"] for r in manifest["validation"].values() for c in r["checks"])


def test_tokenizers_and_scheduler_are_copied(fp32_export) -> None:
    from diffusers import EulerDiscreteScheduler
    from transformers import CLIPTokenizer

    out, _ = fp32_export
    tok = CLIPTokenizer.from_pretrained(out / "tokenizer_2")
    ids = tok("a red cube left of a blue ball", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77 and ids[0] == tok.bos_token_id
    assert (
        EulerDiscreteScheduler.from_pretrained(out / "scheduler").config.num_train_timesteps == 1000
    )


def test_unet_parity_batch_and_resolution_from_one_file(fp32_export, gated_unet) -> None:
    out, _ = fp32_export
    unet, _ = gated_unet
    sess = session(out / "unet" / "model.onnx")
    for i, point in enumerate(POINTS):
        feed = unet_feed(*point, seed=i)
        ref = torch_unet(unet, feed)
        got = torch.from_numpy(sess.run([UNET_OUT], np_feed(feed))[0])
        diff = (got - ref).abs().max().item()
        rel = diff / ref.abs().max().item()
        print(f"fp32 unet {point}: max abs {diff:.2e}, relative {rel:.2e}")
        assert got.shape == ref.shape
        assert diff <= 1e-4  # fp32 vs fp32: op-order rounding only


def test_per_layer_outputs_are_the_layers_probabilities(fp32_export, gated_unet) -> None:
    out, _ = fp32_export
    unet, gates = gated_unet
    feed = unet_feed(2, 128, 192, seed=9)
    captured: dict[str, torch.Tensor] = {}
    processors = {
        name.removesuffix(".processor"): proc
        for name, proc in unet.attn_processors.items()
        if name.removesuffix(".processor") in gates.layers
    }
    for layer, proc in processors.items():
        original = proc._probabilities

        def record(logits, gate_logits, *args, _layer=layer, _original=original):
            captured[_layer] = _original(logits, gate_logits, *args)
            return captured[_layer]

        proc._probabilities = record
    try:
        with gates.mode(attention="op"):  # the explicit-probabilities path (eager default: SDPA)
            torch_unet(unet, feed)
    finally:
        for proc in processors.values():
            del proc._probabilities
    sess = session(out / "unet" / "model.onnx")
    names = [o.name for o in sess.get_outputs() if o.name.startswith(PER_LAYER_OUTPUT_PREFIX)]
    assert sorted(names) == sorted(PER_LAYER_OUTPUT_PREFIX + layer for layer in gates.layers)
    outputs = dict(zip(names, sess.run(names, np_feed(feed)), strict=True))
    declared = {
        o["name"]: o["shape"]
        for o in json.loads((out / "manifest.json").read_text())["components"]["unet"]["outputs"]
    }
    symbols = {"B": 2, "h": 128 // 8, "w": 192 // 8}
    for layer, ref in captured.items():
        got = torch.from_numpy(outputs[PER_LAYER_OUTPUT_PREFIX + layer])
        assert got.shape == ref.shape
        shape = declared[PER_LAYER_OUTPUT_PREFIX + layer]  # e.g. ["B", 8, "h*w/16", 77]
        assert [eval(str(d), {}, symbols) for d in shape] == list(got.shape)
        assert (got[ref == 0] == 0).all()  # the same tokens are closed
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)  # fp32 probabilities


def test_custom_nodes_cover_exactly_the_gated_layers(fp32_export, gated_unet) -> None:
    out, _ = fp32_export
    _, gates = gated_unet
    model = onnx.load(str(out / "unet" / "model.onnx"), load_external_data=False)
    nodes = custom_nodes(model.graph.node)
    assert len(nodes) == len(gates.layers) == 10
    assert sorted(gated_layers_in(model)) == sorted(gates.layers)
    softmax = standard_softmax_layers(model)
    assert not set(softmax) & set(gates.layers)  # no gated layer exported without its gate
    assert any(layer.endswith("attn1") for layer in softmax)  # self-attention stays standard
    for node in nodes:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["plugin_namespace"] == b"maskattn" and attrs["aot"] == 1
        assert attrs["threshold"] == 0.0
    victim = nodes[3]
    victim.op_type, victim.domain = "Softmax", ""
    with pytest.raises(ExportError, match="exported without their gate"):
        check_gate_coverage(gated_layers_in(model), gates.layers, standard_softmax_layers(model))


def test_inlining_the_function_gives_identical_outputs(fp32_export, tmp_path: Path) -> None:
    out, _ = fp32_export
    model = onnx.load(str(out / "unet" / "model.onnx"))
    inlined = inline_functions(model)
    assert not custom_nodes(inlined.graph.node) and not inlined.functions
    feed = np_feed(unet_feed(2, 192, 128, seed=3))
    custom = session(out / "unet" / "model.onnx").run([UNET_OUT], feed)[0]
    plain = ort.InferenceSession(inlined.SerializeToString(), providers=["CPUExecutionProvider"])
    # ONNX Runtime inlines the function itself, so the two graphs compute the same bits.
    np.testing.assert_array_equal(plain.run([UNET_OUT], feed)[0], custom)


# --- fp16, API, external data ------------------------------------------------------------------


def test_fp16_graph_types(fp16_export) -> None:
    out, _ = fp16_export
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["precision"] == "fp16"
    comps = manifest["components"]
    dtypes = {i["name"]: i["dtype"] for i in comps["unet"]["inputs"]}
    assert dtypes == {
        "sample": "float16",
        "timestep": "float32",
        "encoder_hidden_states": "float16",
        "text_embeds": "float16",
        "time_ids": "float32",
    }
    assert comps["text_encoder_2"]["outputs"][1]["dtype"] == "float16"
    for vae in ("vae_decoder", "vae_encoder"):  # the VAE stays fp32 without --vae-fp16
        assert comps[vae]["precision"] == "fp32"
        assert comps[vae]["inputs"][0]["dtype"] == "float32"
    for name in ("unet", "text_encoder", "text_encoder_2"):
        path = out / name / "model.onnx"
        inferred = onnx.shape_inference.infer_shapes(onnx.load(str(path), load_external_data=False))
        assert fp32_outside_islands(inferred, name) == []
        fp32_weights = [i for i in inferred.graph.initializer if i.data_type == TensorProto.FLOAT]
        fp16_weights = [i for i in inferred.graph.initializer if i.data_type == TensorProto.FLOAT16]
        assert fp16_weights
        if name != "unet":
            assert fp32_weights == []
            continue
        # fp32 weights only in the gate heads (and the time-embedding frequencies).
        consumers = {}
        for node in inferred.graph.node:
            for inp in node.input:
                consumers.setdefault(inp, []).append(node)
        for init in fp32_weights:
            scopes = {s for n in consumers.get(init.name, []) for s in node_scopes(n)}
            gate = any(s.startswith("gates.") for s in scopes)
            time = any(s.endswith("time_proj") for s in scopes)
            resize = all(n.op_type == "Resize" for n in consumers.get(init.name, []))
            assert gate or time or resize, init.name


def test_fp16_unet_custom_nodes_dispatch_to_the_tensorrt_plugin(fp16_export) -> None:
    """Each custom node carries what TensorRT's ONNX parser needs to import it as the AOT plugin
    (the creator's fields as NVIDIA's tensorrt.plugin registers them, see tests/_qdp.py), and
    its logits/gate dtypes are a combination the plugin implements."""
    from _qdp import creator_fields
    from maskattn_deploy.plugins.trt_plugin import TYPE_COMBINATIONS

    from maskattn_deploy.engine.network import custom_node_problems, onnx_custom_nodes
    from maskattn_deploy.ops.contract import PLUGIN_NAME

    out, _ = fp16_export
    path = out / "unet" / "model.onnx"
    nodes = onnx_custom_nodes(path)
    assert len(nodes) == 10  # one per gated layer of the tiny UNet
    assert custom_node_problems(nodes, {PLUGIN_NAME: creator_fields()}) == []
    inferred = onnx.shape_inference.infer_shapes(onnx.load(str(path), load_external_data=False))
    types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
    names = {TensorProto.FLOAT: "fp32", TensorProto.FLOAT16: "fp16"}
    implemented = {(s, g) for _, s, g in TYPE_COMBINATIONS}
    for node in nodes:
        pair = tuple(names.get(types.get(name), types.get(name)) for name in node.input)
        assert pair in implemented, (node.name, pair)


def test_fp32_island_check_catches_a_stray_fp32_tensor(fp16_export) -> None:
    out, _ = fp16_export
    model = onnx.load(str(out / "text_encoder" / "model.onnx"), load_external_data=False)
    node = next(n for n in model.graph.node if n.op_type == "MatMul")
    cast_up = onnx.helper.make_node("Cast", [node.output[0]], ["up"], to=TensorProto.FLOAT)
    cast_down = onnx.helper.make_node("Cast", ["up"], ["down"], to=TensorProto.FLOAT16)
    for other in model.graph.node:
        for i, name in enumerate(other.input):
            if name == node.output[0]:
                other.input[i] = "down"
    index = list(model.graph.node).index(node)
    model.graph.node.insert(index + 1, cast_down)
    model.graph.node.insert(index + 1, cast_up)
    inferred = onnx.shape_inference.infer_shapes(model)
    assert fp32_outside_islands(inferred, "text_encoder") == ["up (Cast)", "up (input of Cast)"]


def test_fp16_unet_parity_where_ort_cpu_runs_it(fp16_export, gated_unet) -> None:
    out, lines = fp16_export
    unet, _ = gated_unet
    manifest = json.loads((out / "manifest.json").read_text())
    fallback = manifest["validation"]["unet"]["ort_cpu_fp32_fallback_ops"]
    # ORT's CPU provider has no fp16 kernel for these: it computes them in fp32 between Casts.
    assert {"Conv", "MatMul"} <= set(fallback)
    assert any("ORT CPU has no fp16 kernel for" in line and "Conv" in line for line in lines)
    sess = session(out / "unet" / "model.onnx")
    for i, point in enumerate(POINTS):
        feed = unet_feed(*point, seed=20 + i)
        rounded = {
            k: (v if k in ("timestep", "time_ids") else v.half().float()) for k, v in feed.items()
        }
        ref = torch_unet(unet, rounded)
        got = sess.run([UNET_OUT], np_feed(feed, fp16=True))[0]
        assert got.dtype == np.float16
        got_t = torch.from_numpy(got).float()
        diff = (got_t - ref).abs().max().item()
        scale = ref.abs().max().item()
        print(f"fp16 unet {point}: max abs {diff:.2e}, relative {diff / scale:.2e}")
        # fp16 storage (2^-11 relative) through ~40 layers, fp32 reference: 2e-2 + 1% of range.
        assert torch.isfinite(got_t).all() and diff <= 2e-2 + 1e-2 * scale


def test_external_data_everywhere_when_forced(fp16_export) -> None:
    out, _ = fp16_export
    manifest = json.loads((out / "manifest.json").read_text())
    for info in manifest["components"].values():
        onnx_path, data = out / info["path"], out / f"{info['path']}.data"
        assert info["external_data"] is True and data.is_file()
        assert manifest["files"][f"{info['path']}.data"] == sha256_file(data)
        model = onnx.load(str(onnx_path), load_external_data=False)
        locations = {
            e.value for i in model.graph.initializer for e in i.external_data if e.key == "location"
        }
        assert locations == {"model.onnx.data"}
        onnx.checker.check_model(str(onnx_path), full_check=True)  # path-based: works past 2 GB
        session(onnx_path)  # ONNX Runtime resolves the data file beside the model
    checks = manifest["validation"]["vae_encoder"]["checks"]
    assert checks and all(c["ok"] for c in checks)
