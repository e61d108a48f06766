"""Serving pieces that need no running server: request checks, repositories, TensorRT configs.

The config.pbtxt files are parsed back with Triton's own ModelConfig protobuf and compared with
values written out by hand from the protocol table and the tiny recipe.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from maskattn_deploy.errors import UserError
from maskattn_deploy.serve.protocol import INPUTS, OUTPUTS, Limits, RequestError, parse_request
from maskattn_deploy.serve.repository import (
    COMPONENT_MODELS,
    ServeConfig,
    check_plan_io,
    plan_config_text,
    write_repository,
)

pytest.importorskip("tritonclient.grpc", reason="the serve extra is not installed")


def parse_config(text: str):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(text, model_config_pb2.ModelConfig())


def fields(**values) -> dict[str, np.ndarray]:
    out = {}
    for name, value in values.items():
        dtype = {"PROMPT": object, "NEGATIVE_PROMPT": object, "SCHEDULER": object}.get(name)
        out[name] = np.array([[value]], dtype=dtype) if dtype else np.array([[value]])
    return out


# ---------------------------------------------------------------------- requests


def test_defaults_and_values_pass_through() -> None:
    kwargs, masks = parse_request(fields(PROMPT=b"a cat"), Limits(default_steps=8))
    assert (
        kwargs
        == {
            "prompt": "a cat",
            "negative_prompt": "",
            "seed": 0,
            "steps": 8,
            "guidance": 5.0,
            "scheduler": "euler",
        }
        and masks is False
    )
    kwargs, masks = parse_request(
        fields(
            PROMPT=b"x",
            SEED=np.int64(2**63 - 1),  # the largest INT64 seed
            STEPS=np.int32(4),
            GUIDANCE=np.float32(1.0),
            HEIGHT=np.int32(128),
            RETURN_MASKS=True,
        ),
        Limits(),
    )
    assert (kwargs["seed"], kwargs["steps"], kwargs["guidance"], kwargs["height"]) == (
        2**63 - 1,
        4,
        1.0,
        128,
    )
    assert masks is True and "width" not in kwargs


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"PROMPT": b"   "}, "PROMPT is empty"),
        # STEPS: the server's --max-steps (150 by default), tighter than the library's 1000
        ({"PROMPT": b"x", "STEPS": np.int32(0)}, "STEPS must be an integer in 1..150, got 0"),
        ({"PROMPT": b"x", "STEPS": np.int32(151)}, "STEPS must be an integer in 1..150, got 151"),
        # the library's request limits (runtime.limits), named as request fields
        ({"PROMPT": b"x", "GUIDANCE": np.float32(math.nan)}, "GUIDANCE must be a finite number"),
        ({"PROMPT": b"x", "GUIDANCE": np.float32(math.inf)}, "in 0..100, got inf"),
        (
            {"PROMPT": b"x", "GUIDANCE": np.float32(-1)},
            "GUIDANCE must be a finite number in 0..100, got -1",
        ),
        (
            {"PROMPT": b"x", "SEED": np.int64(-1)},
            "SEED must be an integer in 0..18446744073709551615, got -1",
        ),
        ({"PROMPT": b"x", "HEIGHT": np.int32(100)}, "HEIGHT 100 must be a positive multiple of 8"),
        (
            {"PROMPT": b"x", "WIDTH": np.int32(8192)},
            "WIDTH must be an integer in 8..4096, got 8192",
        ),
        ({"PROMPT": b"\xff\xfe"}, "PROMPT is not valid UTF-8"),
        ({"PROMPT": b"x" * 20000}, "PROMPT is 20000 bytes"),
    ],
)
def test_bad_values_are_refused_with_the_field_name(values, message) -> None:
    with pytest.raises(RequestError, match=message.replace("(", r"\(").replace(".", r"\.")):
        parse_request(fields(**values), Limits())


def test_more_than_one_value_per_request_is_refused() -> None:
    with pytest.raises(RequestError, match=r"send one value per request"):
        parse_request({"PROMPT": np.array([[b"a"], [b"b"]], dtype=object)}, Limits())


# ---------------------------------------------------------------------- repositories


@pytest.fixture
def fake_export(tmp_path) -> Path:
    """A minimal export folder (manifest + config dirs + placeholder ONNX files)."""
    folder = tmp_path / "export"
    for name in ("unet", "text_encoder", "text_encoder_2", "vae_decoder", "tokenizer", "scheduler"):
        (folder / name).mkdir(parents=True)
    for name in ("unet", "text_encoder", "text_encoder_2", "vae_decoder"):
        (folder / name / "model.onnx").write_bytes(b"onnx")
    from maskattn_deploy.export.spec import EXPORT_FORMAT

    shapes = {"batch": [1, 2, 4], "height": [128, 256, 384], "width": [128, 256, 384]}
    manifest = {
        "format": EXPORT_FORMAT,
        "model": {"spec": "tiny", "pipeline_class": None, "unet_fingerprint": "unet-test"},
        "opset": 18,
        "precision": "fp16",
        "recipe": {"name": "tiny", "shapes": {**shapes, "text_tokens": 77}},
        "shapes": shapes,
        "components": {
            "unet": {
                "path": "unet/model.onnx",
                "precision": "fp16",
                "inputs": [
                    {"name": "sample", "dtype": "float16", "shape": ["B", 4, "h", "w"]},
                    {"name": "timestep", "dtype": "float32", "shape": ["B"]},
                    {"name": "encoder_hidden_states", "dtype": "float16", "shape": ["B", 77, 64]},
                    {"name": "text_embeds", "dtype": "float16", "shape": ["B", 32]},
                    {"name": "time_ids", "dtype": "float32", "shape": ["B", 6]},
                ],
                "outputs": [
                    {"name": "out_sample", "dtype": "float16", "shape": ["B", 4, "h", "w"]}
                ],
            },
        },
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def test_pipeline_config_carries_the_protocol_batching_and_settings(fake_export, tmp_path) -> None:
    config = ServeConfig(max_batch=6, max_queue_delay_ms=2.5, max_queue=9, instances=3, threads=2)
    repo = write_repository(tmp_path / "repo", fake_export, config, copy_export=False)
    model = parse_config((repo / "maskattn_sdxl" / "config.pbtxt").read_text())
    assert model.backend == "python" and model.max_batch_size == 6
    assert model.dynamic_batching.max_queue_delay_microseconds == 2500
    assert model.dynamic_batching.default_queue_policy.max_queue_size == 9
    cpu = parse_config('name: "x"').instance_group.add().KIND_CPU
    assert [(g.count, g.kind) for g in model.instance_group] == [(3, cpu)]
    assert [i.name for i in model.input] == list(INPUTS)
    assert [i.optional for i in model.input] == [not r for _, _, r in INPUTS.values()]
    assert [o.name for o in model.output] == list(OUTPUTS)
    params = {k: v.string_value for k, v in model.parameters.items()}
    back, where = ServeConfig.from_parameters(params)
    assert (
        where == str(fake_export.resolve()) and back.threads == 2 and back.backend == "onnxruntime"
    )
    assert "TritonPythonModel" in (repo / "maskattn_sdxl" / "1" / "model.py").read_text()
    with pytest.raises(UserError, match="already exists"):
        write_repository(repo, fake_export, config, copy_export=False)


def test_self_contained_repository_links_the_export_without_engines(fake_export, tmp_path) -> None:
    (fake_export / "engines").mkdir()
    (fake_export / "engines" / "unet.engine").write_bytes(b"plan")
    repo = write_repository(tmp_path / "repo", fake_export, ServeConfig(), copy_export=True)
    inside = repo / "maskattn_sdxl" / "1" / "export"
    assert (inside / "manifest.json").read_text() == (fake_export / "manifest.json").read_text()
    assert (inside / "unet" / "model.onnx").stat().st_ino == (
        fake_export / "unet" / "model.onnx"
    ).stat().st_ino
    assert not (inside / "engines").exists()
    model = parse_config((repo / "maskattn_sdxl" / "config.pbtxt").read_text())
    assert model.parameters["export_dir"].string_value == "export"  # relative: moves with the repo


# ---------------------------------------------------------------------- TensorRT plans


def write_engine(export: Path, component: str, profiles: list[dict]) -> None:
    """A placeholder engine file with the manifest the engine builder writes beside it."""
    from maskattn_deploy.engine.manifest import (
        current_environment,
        make_engine_manifest,
        write_engine_manifest,
    )

    engine = export / "engines" / f"{component}.engine"
    engine.parent.mkdir(exist_ok=True)
    engine.write_bytes(b"plan bytes")
    environment = current_environment("10.9.0.34", "NVIDIA H100", (9, 0))
    manifest = make_engine_manifest(
        component, environment, f"{component}/model.onnx", "0" * 64, profiles, None, 1.0, {}
    )
    write_engine_manifest(engine, manifest)


def tiny_profiles(inputs) -> list[dict]:
    """The engine builder's own profiles for the tiny recipe (what build writes in manifests)."""
    from maskattn_deploy.engine.profiles import component_profiles

    return [p.as_dict() for p in component_profiles("tiny", "unet", inputs)]


def test_plan_config_matches_engine_and_export_manifests(fake_export) -> None:
    unet = json.loads((fake_export / "manifest.json").read_text())["components"]["unet"]
    model = parse_config(plan_config_text("maskattn_unet", unet, tiny_profiles(unet["inputs"])))
    assert model.platform == "tensorrt_plan" and model.max_batch_size == 0
    # tiny recipe: batch 1..4 (static-256 fixes it to 2, but the dynamic profile varies), 128-384 px
    from tritonclient.grpc import model_config_pb2 as mc

    fp16, fp32 = mc.TYPE_FP16, mc.TYPE_FP32
    expected = {
        "sample": (fp16, [-1, 4, -1, -1]),
        "timestep": (fp32, [-1]),
        "encoder_hidden_states": (fp16, [-1, 77, 64]),
        "text_embeds": (fp16, [-1, 32]),
        "time_ids": (fp32, [-1, 6]),
    }
    assert {i.name: (i.data_type, list(i.dims)) for i in model.input} == expected
    assert [(o.name, o.data_type, list(o.dims)) for o in model.output] == [
        ("out_sample", fp16, [-1, 4, -1, -1])
    ]
    assert [list(g.profile) for g in model.instance_group] == [["0", "1"]]
    assert [g.kind for g in model.instance_group] == [mc.ModelInstanceGroup.KIND_GPU]


def test_plan_config_refuses_engines_built_from_another_export(fake_export) -> None:
    unet = json.loads((fake_export / "manifest.json").read_text())["components"]["unet"]
    profiles = tiny_profiles(unet["inputs"])
    del profiles[0]["shapes"]["time_ids"]
    with pytest.raises(UserError, match="covers inputs .* but the export has"):
        check_plan_io("maskattn_unet", unet["inputs"], profiles)
    with pytest.raises(UserError, match="lists no optimization profiles"):
        check_plan_io("maskattn_unet", unet["inputs"], [])


def test_export_triton_with_engines_writes_plan_models(
    fake_export, tmp_path, monkeypatch, capsys
) -> None:
    """Placeholder engine files (never loaded here) next to real-format engine manifests:
    export-triton must turn them into tensorrt_plan models the pipeline calls over BLS."""
    unet = json.loads((fake_export / "manifest.json").read_text())["components"]["unet"]
    write_engine(fake_export, "unet", tiny_profiles(unet["inputs"]))
    code = _cli(monkeypatch, "export-triton", str(fake_export), "--out", str(tmp_path / "repo"))
    out = capsys.readouterr()
    assert code == 0, out.err
    repo = tmp_path / "repo"
    assert "backend tensorrt" in out.out
    assert (repo / "maskattn_unet" / "1" / "model.plan").read_bytes() == b"plan bytes"
    pipeline = parse_config((repo / "maskattn_sdxl" / "config.pbtxt").read_text())
    assert json.loads(pipeline.parameters["component_models"].string_value) == {
        "unet": COMPONENT_MODELS["unet"]
    }
    inside = repo / "maskattn_sdxl" / "1" / "export"
    assert (inside / "vae_decoder" / "model.onnx").exists()  # no engine: runs on ONNX Runtime
    assert not (inside / "engines").exists()


def test_export_triton_refuses_a_missing_export_and_torch(
    fake_export, tmp_path, monkeypatch, capsys
) -> None:
    assert (
        _cli(monkeypatch, "export-triton", str(tmp_path / "nope"), "--out", str(tmp_path / "r"))
        == 2
    )
    assert "does not exist" in capsys.readouterr().err
    args = ("export-triton", str(fake_export), "--out", str(tmp_path / "r"), "--backend", "torch")
    assert _cli(monkeypatch, *args) == 2
    assert "maskattn-deploy serve --backend torch" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def _cli(monkeypatch, *args: str) -> int:
    import sys

    from maskattn_deploy.cli.main import main

    monkeypatch.setattr(sys, "argv", ["maskattn-deploy", *args])
    try:
        main()
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def test_loadtest_percentiles() -> None:
    from maskattn_deploy.serve.loadtest import percentiles

    values = [i / 1000 for i in range(1, 101)]  # 1..100 ms
    result = percentiles(values)
    assert result["p50"] == pytest.approx(50.5) and result["p99"] == pytest.approx(99.01)
    assert percentiles([]) == {}


def test_text_encoder_plan_declares_only_the_outputs_its_engine_keeps(
    fake_export, tmp_path
) -> None:
    """Optimum's layout exports every hidden state; the engine keeps the penultimate one (the
    layer SDXL conditions on: hidden_states.2 of 0..3) and text_embeds, and so does the plan."""
    manifest = json.loads((fake_export / "manifest.json").read_text())
    states = [f"hidden_states.{i}" for i in range(4)]
    manifest["components"]["text_encoder_2"] = {
        "path": "text_encoder_2/model.onnx",
        "precision": "fp32",
        "inputs": [{"name": "input_ids", "dtype": "int64", "shape": ["B", 77]}],
        "outputs": [{"name": "text_embeds", "dtype": "float32", "shape": ["B", 32]}]
        + [
            {"name": n, "dtype": "float32", "shape": ["B", 77, 32]}
            for n in ["last_hidden_state", *states]
        ],
    }
    (fake_export / "manifest.json").write_text(json.dumps(manifest))
    profile = {
        "name": "p",
        "shapes": {"input_ids": {"min": [1, 77], "opt": [2, 77], "max": [4, 77]}},
    }
    write_engine(fake_export, "text_encoder_2", [profile])
    repo = write_repository(
        tmp_path / "repo", fake_export, ServeConfig(backend="tensorrt"), copy_export=True
    )
    model = parse_config((repo / "maskattn_text_encoder_2" / "config.pbtxt").read_text())
    assert [o.name for o in model.output] == ["text_embeds", "hidden_states.2"]
    assert [(i.name, list(i.dims)) for i in model.input] == [("input_ids", [-1, 77])]


def test_library_parameter_names_become_request_fields() -> None:
    from maskattn_deploy.runtime.pipeline import check_size
    from maskattn_deploy.serve.protocol import field_message

    with pytest.raises(UserError) as caught:
        check_size("height", 100, None)
    assert field_message(caught.value) == "HEIGHT 100 must be a positive multiple of 8"
    plain = UserError("steps and the height of the hill", params=("num_images",))
    assert field_message(plain) == "steps and the height of the hill"  # only listed names change
