"""``export --attention-node fused``: one MaskedCrossAttention node per gated layer.

The tiny gated UNet is exported with the fused node (fp32 and fp16, validated against PyTorch by
the exporter itself) and the fp32 export passes ``maskattn-deploy parity`` (torch vs ONNX
Runtime), like the default softmax-node export does in test_parity_export.py. Option errors are
one line naming the flags.
"""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
from _gates import write_distinct_gates
from click.testing import CliRunner

from maskattn_deploy.cli.main import cli
from maskattn_deploy.errors import UserError
from maskattn_deploy.export.onnx_op import custom_nodes, inline_functions
from maskattn_deploy.ops.contract import ATTENTION_PLUGIN_NAME, PLUGIN_NAME

pytestmark = pytest.mark.slow  # two UNet exports, about 30 s each on 2 cores


@pytest.fixture(scope="module")
def gates_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Seeded untrained gates with distinct biases (see ``_gates.write_distinct_gates``)."""
    return write_distinct_gates(tmp_path_factory.mktemp("gates"))


def _export(tmp_path_factory, gates_dir: Path, fp16: bool) -> Path:
    from maskattn_deploy.export import export_unet
    from maskattn_deploy.gating.checkpoint import load_gates
    from maskattn_deploy.models import load_pipeline

    unet = load_pipeline("tiny").unet
    load_gates(gates_dir, unet)
    out = tmp_path_factory.mktemp("export") / f"fused-{'fp16' if fp16 else 'fp32'}"
    # validate=True: the exporter compares ONNX Runtime with PyTorch at two shape points.
    export_unet(
        unet, out, recipe="tiny", fp16=fp16, source="tiny", gates_checkpoint=gates_dir,
        attention_node="fused",
    )  # fmt: skip
    return out


@pytest.fixture(scope="module")
def fused_fp32(tmp_path_factory, gates_dir: Path) -> Path:
    return _export(tmp_path_factory, gates_dir, fp16=False)


def _model(folder: Path) -> onnx.ModelProto:
    return onnx.load(str(folder / "unet" / "model.onnx"), load_external_data=False)


def test_each_gated_layer_is_one_fused_node(fused_fp32: Path) -> None:
    model = _model(fused_fp32)
    manifest = json.loads((fused_fp32 / "manifest.json").read_text())
    nodes = custom_nodes(model.graph.node)
    assert [n.op_type for n in nodes] == [ATTENTION_PLUGIN_NAME] * len(manifest["gated_layers"])
    assert len(nodes) == 10  # the tiny UNet's mid stage
    assert [n.name.removesuffix(f"/{ATTENTION_PLUGIN_NAME}") for n in nodes] == manifest[
        "gated_layers"
    ]
    assert [f.name for f in model.functions] == [ATTENTION_PLUGIN_NAME]
    assert not any(n.op_type == PLUGIN_NAME for n in model.graph.node)
    # The gated layers have no standard Softmax left; the ungated self-attention layers keep theirs.
    inlined = inline_functions(model)
    assert not custom_nodes(inlined.graph.node)
    assert manifest["plugin"]["op_type"] == ATTENTION_PLUGIN_NAME
    assert manifest["plugin"]["attention_node"] == "fused"
    scales = [a.f for n in nodes for a in n.attribute if a.name == "scale"]
    assert scales == [pytest.approx(16**-0.5)] * 10  # the tiny UNet's head dim is 16


def test_fused_export_passes_parity(fused_fp32: Path, tmp_path: Path) -> None:
    json_path = tmp_path / "parity.json"
    result = CliRunner().invoke(
        cli, ["parity", str(fused_fp32), "--no-e2e", "--json", str(json_path)]
    )
    assert result.exit_code == 0, result.output
    data = json.loads(json_path.read_text())
    assert data["passed"] is True
    status = {b["name"]: b["status"] for b in data["backends"]}
    assert status["torch"] == "reference" and status["onnxruntime"] == "ran"
    (verdict,) = data["outputs"]
    assert (verdict["output"], verdict["passed"]) == ("out_sample", True)
    assert "PASS    unet/out_sample [onnxruntime vs torch" in result.output


def test_fp16_fused_export_keeps_fp32_only_in_the_gate_island(
    tmp_path_factory, gates_dir: Path
) -> None:
    folder = _export(tmp_path_factory, gates_dir, fp16=True)
    nodes = custom_nodes(_model(folder).graph.node)
    assert len(nodes) == 10
    manifest = json.loads((folder / "manifest.json").read_text())
    (check, *_) = manifest["validation"]["unet"]["checks"]
    assert check["ok"] is True  # ONNX Runtime vs PyTorch fp16 within the spec's tolerance


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"attention_node": "flash"}, "attention_node must be one of softmax, fused"),
        ({"attention_node": "fused", "per_layer": True}, "per_layer needs attention_node softmax"),
    ],
)
def test_bad_options_are_refused_before_any_work(tmp_path: Path, overrides, needle) -> None:
    from maskattn_deploy.export import export_unet
    from maskattn_deploy.models.tiny import build_tiny_unet

    with pytest.raises(UserError, match=needle):
        export_unet(build_tiny_unet(), tmp_path / "out", recipe="tiny", **overrides)
    assert not (tmp_path / "out").exists()


def test_cli_names_the_flags(tmp_path: Path) -> None:
    args = ["export", "--out", str(tmp_path / "x"), "--attention-node", "fused", "--per-layer"]
    result = CliRunner().invoke(cli, args)
    # The library error, shown with the command's flags (main() prints it as one line).
    assert isinstance(result.exception, UserError)
    assert str(result.exception).startswith("--per-layer needs --attention-node softmax")
    assert not (tmp_path / "x").exists()
