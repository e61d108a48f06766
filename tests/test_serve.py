"""A real Triton Inference Server serving the tiny model on loopback (ONNX Runtime CPU).

``maskattn-deploy serve`` runs as a subprocess with free ports; each test stops what it
started. Images are compared with the same request run through the pipeline ``generate``
uses: ONNX Runtime CPU computes every row the same way at any batch size, so the expectation
is bit-identical pixels (tests/test_runtime_batching.py states the tolerances per backend).
"""

from __future__ import annotations

import json
import math
import signal
import socket
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from _serving import require_server

from maskattn_deploy.runtime.pipeline import GenerateConfig, Pipeline
from maskattn_deploy.serve.client import OVERLOADED, Request, ServeError, connect, generate
from maskattn_deploy.serve.server import process_tree
from maskattn_deploy.serve.spawn import spawn_serve, survivors

pytestmark = pytest.mark.slow
SIZE = {"height": 128, "width": 128}
PROMPTS = ("a red square left of a green circle", "a blue dog on a beach")


@pytest.fixture(scope="module")
def export_dir() -> Path:
    require_server()
    from maskattn_deploy.models.tiny import tiny_default_gates_dir
    from maskattn_deploy.runtime.api import ensure_tiny_export

    return ensure_tiny_export(tiny_default_gates_dir(), lambda _: None)[0]


@pytest.fixture(scope="module")
def server(export_dir, tmp_path_factory):
    """One server for the module: batches of up to 4 requests, a queue of 12."""
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    served = spawn_serve(
        [str(export_dir), "--max-batch", "4", "--max-queue", "12", "--threads", "1", "--quiet"], log
    )
    yield served
    assert served.stop() == 0, served.log_text()[-3000:]


@pytest.fixture(scope="module")
def reference(export_dir) -> Pipeline:
    """The pipeline generate runs on the same export (ONNX Runtime CPU, one thread as served)."""
    from maskattn_deploy.runtime.model_info import ModelInfo
    from maskattn_deploy.runtime.ort_backend import ort_backend

    info = ModelInfo.from_export(export_dir)
    return Pipeline(ort_backend(export_dir, info.export_manifest, "cpu", threads=1), info)


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def test_eight_clients_four_requests_each_all_answered_like_generate(server, reference) -> None:
    results: dict[tuple[int, int], object] = {}
    failures: list[str] = []

    def client(index: int) -> None:
        conn = connect(server.http)
        try:
            for k in range(4):
                guidance = 1.0 if (index + k) % 3 == 0 else 5.0  # guidance off: another batch key
                request = Request(
                    PROMPTS[index % 2], seed=100 + 4 * index + k, steps=2, guidance=guidance, **SIZE
                )
                try:
                    results[(index, k)] = (request, generate(conn, request))
                except ServeError as exc:
                    failures.append(str(exc))
        finally:
            conn.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    assert not failures and len(results) == 32
    batches = max(served.timings["batch_size"] for _, served in results.values())
    assert batches > 1, "dynamic batching never put two requests together"
    for request, served in results.values():
        config = GenerateConfig(
            request.prompt, steps=2, seed=request.seed, guidance=request.guidance, **SIZE
        )
        expected = reference.generate(config, progress=False)
        assert np.array_equal(pixels(served.image), pixels(expected.images[0])), request
        assert served.settings["seed"] == request.seed and served.settings["steps"] == 2


def test_response_fields_and_gate_statistics(server, export_dir) -> None:
    from maskattn_deploy.models.tiny import tiny_default_gates_dir
    from maskattn_deploy.runtime.api import torch_pipeline

    conn = connect(server.http)
    try:
        request = Request(PROMPTS[0], seed=9, steps=3, return_masks=True, **SIZE)
        served = generate(conn, request, outputs=None)
        everything = generate(
            conn, replace(request, return_masks=False), outputs=("IMAGE", "IMAGE_PNG")
        )
    finally:
        conn.close()
    assert served.timings["batch_size"] >= 1 and len(served.timings["unet_steps_s"]) == 3
    assert served.settings["backend"] == "onnxruntime" and served.settings["gates_sha256"] != "none"
    assert served.tokens[0] == "<start>" and served.tokens[-1] == "<end>"
    # the torch reference (gates in the GateSet, not in the ONNX graph) on the same request
    ref = torch_pipeline("tiny", tiny_default_gates_dir(), torch.device("cpu")).generate_batch(
        [GenerateConfig(PROMPTS[0], steps=3, seed=9, **SIZE)], gate_stats=True, record_masks=True
    )[0]
    assert set(served.gate_open) == set(ref.gate_open)
    for layer, fraction in served.gate_open.items():
        assert fraction == pytest.approx(ref.gate_open[layer], abs=0.01)  # a gate may flip
    assert set(served.masks) == {"mid"} and served.masks["mid"].shape == (77, 16, 16)
    assert np.abs(served.masks["mid"] - ref.masks["mid"][0].numpy()).max() <= 0.05
    assert np.array_equal(pixels(everything.image), pixels(served.image))
    grpc = connect(server.grpc, "grpc")
    try:
        over_grpc = generate(grpc, replace(request, return_masks=False))
    finally:
        grpc.close()
    assert np.array_equal(pixels(over_grpc.image), pixels(served.image))
    assert over_grpc.gate_open == served.gate_open


def _raw(conn, inputs: dict[str, tuple[str, list[int], np.ndarray]]):
    """Send arbitrary tensors (names, types, shapes the protocol may not accept)."""
    import tritonclient.http as http

    tensors = []
    for name, (dtype, shape, value) in inputs.items():
        tensor = http.InferInput(name, shape, dtype)
        tensor.set_data_from_numpy(value)
        tensors.append(tensor)
    return conn.infer("maskattn_sdxl", tensors, outputs=[http.InferRequestedOutput("SETTINGS")])


PROMPT_T = ("BYTES", [1, 1], np.array([[b"a cat"]], dtype=object))


def _i32(value: int):
    return ("INT32", [1, 1], np.array([[value]], dtype=np.int32))


def _f32(value: float):
    return ("FP32", [1, 1], np.array([[value]], dtype=np.float32))


BAD_REQUESTS = [
    ({"PROMPT": PROMPT_T, "COLOUR": _i32(3)}, "unexpected inference input 'COLOUR'"),
    ({"PROMPT": PROMPT_T, "SEED": _f32(1.0)}, "expects 'INT64'"),
    ({"PROMPT": ("BYTES", [1, 2], np.array([[b"a", b"b"]], dtype=object))}, "PROMPT"),
    ({"SEED": ("INT64", [1, 1], np.array([[1]], dtype=np.int64))}, "PROMPT"),
    ({"PROMPT": ("BYTES", [1, 1], np.array([[b""]], dtype=object))}, "PROMPT is empty"),
    ({"PROMPT": PROMPT_T, "HEIGHT": _i32(100)}, "HEIGHT 100 must be a positive multiple of 8"),
    ({"PROMPT": PROMPT_T, "HEIGHT": _i32(512)}, "outside the exported range 128..384"),
    ({"PROMPT": PROMPT_T, "WIDTH": _i32(136)}, "WIDTH 136 must be a multiple of 32 px"),
    ({"PROMPT": PROMPT_T, "STEPS": _i32(0)}, "STEPS must be an integer in 1..150, got 0"),
    ({"PROMPT": PROMPT_T, "STEPS": _i32(1_000_000)}, "in 1..150, got 1000000"),
    ({"PROMPT": PROMPT_T, "GUIDANCE": _f32(math.nan)}, "GUIDANCE must be a finite number"),
    ({"PROMPT": PROMPT_T, "GUIDANCE": _f32(math.inf)}, "GUIDANCE must be a finite number"),
    (
        {"PROMPT": PROMPT_T, "SEED": ("INT64", [1, 1], np.array([[-5]], dtype=np.int64))},
        "SEED must be an integer in 0..",
    ),
    (
        {"PROMPT": PROMPT_T, "SCHEDULER": ("BYTES", [1, 1], np.array([[b"nope"]], dtype=object))},
        "unknown scheduler 'nope'",
    ),
]


def test_bad_requests_get_clear_errors_and_the_server_keeps_serving(server) -> None:
    from tritonclient.utils import InferenceServerException

    conn = connect(server.http)
    try:
        for inputs, message in BAD_REQUESTS:
            with pytest.raises(InferenceServerException) as caught:
                _raw(conn, inputs)
            assert message in caught.value.message(), (inputs.keys(), caught.value.message())
            assert caught.value.status() == "400", caught.value.status()
        long_prompt = " ".join(["red"] * 120)
        served = generate(conn, Request(long_prompt, steps=1, **SIZE))
        assert any("token(s) were dropped" in w for w in served.warnings)
        assert generate(conn, Request("still serving", steps=1, **SIZE)).image is not None
    finally:
        conn.close()
    assert server.process.poll() is None


def test_client_command_writes_the_png_generate_writes(
    server, tmp_path, monkeypatch, capsys
) -> None:
    from maskattn_deploy.cli.main import main
    from maskattn_deploy.runtime.api import GenerateOptions, run_generate
    from maskattn_deploy.runtime.outputs import read_png_settings

    monkeypatch.setattr(
        sys,
        "argv",
        [
            "maskattn-deploy",
            "client",
            PROMPTS[1],
            "--url",
            server.http,
            "--out",
            str(tmp_path / "c"),
            "--seed",
            "5",
            "--steps",
            "2",
            "--height",
            "128",
            "--width",
            "128",
        ],
    )
    try:
        main()
    except SystemExit as exc:
        assert not exc.code
    served_png = next((tmp_path / "c").glob("*.png"))
    report = run_generate(
        GenerateOptions(PROMPTS[1], seed=5, steps=2, out=tmp_path / "g", progress=False, **SIZE),
        say=lambda _: None,
    )
    from PIL import Image

    assert np.array_equal(pixels(Image.open(served_png)), pixels(Image.open(report.images[0])))
    assert read_png_settings(served_png) == read_png_settings(report.images[0])
    assert f"wrote {served_png}" in capsys.readouterr().out


def test_loadtest_command_reports_throughput_latency_and_batches(
    server, monkeypatch, capsys
) -> None:
    from maskattn_deploy.cli.main import main

    monkeypatch.setattr(
        sys,
        "argv",
        [
            "maskattn-deploy",
            "loadtest",
            "--url",
            server.http,
            "--metrics-url",
            server.metrics,
            "--concurrency",
            "1,3",
            "--requests",
            "3",
            "--steps",
            "1",
            "--height",
            "128",
            "--width",
            "128",
            "--json",
        ],
    )
    try:
        main()
    except SystemExit as exc:
        assert not exc.code
    report = json.loads(capsys.readouterr().out)
    for level in report["levels"]:
        assert level["answered"] == 3 and not level["errors"]
        assert (
            level["throughput_rps"] > 0 and level["latency_ms"]["p50"] <= level["latency_ms"]["p99"]
        )
        assert sum(int(size) * count for size, count in level["batch_sizes"].items()) == 3
    assert (
        report["levels"][0]["batch_sizes"] == {"1": 3} and report["levels"][0]["mean_batch"] == 1.0
    )


def test_a_client_that_disconnects_mid_request_does_not_hurt_the_server(server) -> None:
    host, port = server.http.rsplit(":", 1)
    body = json.dumps(
        {
            "inputs": [
                {"name": "PROMPT", "shape": [1, 1], "datatype": "BYTES", "data": ["gone"]},
                {"name": "STEPS", "shape": [1, 1], "datatype": "INT32", "data": [6]},
            ]
        }
    ).encode()
    head = (
        f"POST /v2/models/maskattn_sdxl/infer HTTP/1.1\r\nHost: {host}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    for _ in range(3):
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(head + body)
        # closed before the answer: the server finishes the work and drops the reply
    conn = connect(server.http)
    try:
        assert generate(conn, Request("after the hang-ups", steps=1, **SIZE)).image is not None
    finally:
        conn.close()
    assert server.process.poll() is None


def test_a_burst_beyond_the_queue_is_refused_as_overloaded_never_hangs(server) -> None:
    outcomes: list[str] = []
    lock = threading.Lock()

    def one(index: int) -> None:
        conn = connect(server.http, timeout_s=300)
        try:
            generate(conn, Request("burst", seed=index, steps=4, **SIZE), outputs=("SETTINGS",))
            result = "ok"
        except ServeError as exc:
            result = exc.kind if exc.kind == OVERLOADED else str(exc)
        finally:
            conn.close()
        with lock:
            outcomes.append(result)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(40)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert len(outcomes) == 40, "a request hung"
    assert set(outcomes) <= {"ok", OVERLOADED}, outcomes
    assert outcomes.count(OVERLOADED) >= 1 and outcomes.count("ok") >= 12


def test_sigterm_under_load_answers_every_accepted_request_and_exits_0(
    export_dir, tmp_path
) -> None:
    """serve --model tiny (the cached export of the export_dir fixture) under load from six
    clients gets SIGTERM: requests in flight finish, later ones hear "shutting down"."""
    served = spawn_serve(
        ["--model", "tiny", "--max-batch", "2", "--threads", "1", "--quiet"], tmp_path / "serve.log"
    )
    tree = served.tree()
    assert len(tree) >= 3, tree  # serve, tritonserver, the Python stub
    outcomes: list[str] = []
    lock = threading.Lock()
    go_on = threading.Event()
    go_on.set()

    def client(index: int) -> None:
        conn = connect(served.http, timeout_s=300)
        try:
            k = 0
            while go_on.is_set():
                try:
                    generate(
                        conn,
                        Request("load", seed=1000 * index + k, steps=3, **SIZE),
                        outputs=("SETTINGS",),
                    )
                    result = "ok"
                except ServeError as exc:
                    result = exc.kind
                with lock:
                    outcomes.append(result)
                if result != "ok":
                    return  # told to go away (or refused): a real client backs off too
                k += 1
        finally:
            conn.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 300
    while outcomes.count("ok") < 4 and time.monotonic() < deadline:
        time.sleep(0.2)
    served.process.send_signal(signal.SIGTERM)
    code = served.process.wait(180)
    go_on.clear()
    for thread in threads:
        thread.join(timeout=60)
    assert code == 0, served.log_text()[-3000:]
    assert not any(t.is_alive() for t in threads), "a client is still waiting for an answer"
    assert set(outcomes) <= {"ok", "shutting_down", "unreachable"}, outcomes
    assert outcomes.count("ok") >= 4 and "shutting_down" in outcomes
    assert survivors(tree) == [], "processes outlived serve"
    assert "stopped (tritonserver exit code" in served.log_text()


def test_bundled_tritonserver_loads_the_export_triton_repository(
    export_dir, reference, tmp_path, monkeypatch, capsys
) -> None:
    """The repository export-triton writes is self-contained: moved elsewhere, Triton itself
    (not serve) loads it and answers like generate."""
    import shutil

    from maskattn_deploy.cli.main import main
    from maskattn_deploy.serve.server import Endpoints, TritonServer

    monkeypatch.setattr(
        sys,
        "argv",
        [
            "maskattn-deploy",
            "export-triton",
            str(export_dir),
            "--out",
            str(tmp_path / "repo"),
            "--max-batch",
            "2",
            "--threads",
            "1",
        ],
    )
    try:
        main()
    except SystemExit as exc:
        assert not exc.code
    assert "maskattn_sdxl (backend onnxruntime)" in capsys.readouterr().out
    moved = tmp_path / "elsewhere" / "models"
    moved.parent.mkdir()
    shutil.move(tmp_path / "repo", moved)
    assert str(export_dir) not in (moved / "maskattn_sdxl" / "config.pbtxt").read_text()
    work = tmp_path / "work"
    work.mkdir()
    # A broken package of the same name where the server is started: the Python-backend stub
    # must still import the maskattn_deploy this process runs (a source checkout in the
    # working directory must not shadow the installed package).
    decoy = tmp_path / "decoy" / "maskattn_deploy"
    decoy.mkdir(parents=True)
    (decoy / "__init__.py").write_text("raise ImportError('decoy package imported')\n")
    monkeypatch.chdir(decoy.parent)
    server = TritonServer(moved, Endpoints(http_port=0, grpc_port=0, metrics_port=0), work)
    with server:
        server.wait_ready(600)
        tree = process_tree(server.process.pid)
        conn = connect(server.endpoints.http_url)
        try:
            served = generate(conn, Request(PROMPTS[0], seed=3, steps=2, **SIZE))
        finally:
            conn.close()
    assert server.process.returncode == 0, server.log_tail()
    expected = reference.generate(
        GenerateConfig(PROMPTS[0], steps=2, seed=3, **SIZE), progress=False
    )
    assert np.array_equal(pixels(served.image), pixels(expected.images[0]))
    assert survivors(tree) == []
    import maskattn_deploy

    imported = Path(maskattn_deploy.__file__).resolve().parent
    assert "maskattn_sdxl ready: " in server.log_path.read_text()
    assert f"({imported})" in server.log_path.read_text(), server.log_tail()


def test_split_components_run_over_bls_like_generate(
    export_dir, reference, tmp_path, monkeypatch
) -> None:
    """Every network its own ONNX Runtime model; the pipeline calls them over BLS (the path
    TensorRT plans take on a GPU machine), and the image stays generate's, bit for bit."""
    from maskattn_deploy.cli.main import main
    from maskattn_deploy.serve.server import Endpoints, TritonServer

    repo = tmp_path / "repo"
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "maskattn-deploy",
            "export-triton",
            str(export_dir),
            "--out",
            str(repo),
            "--split-components",
            "--threads",
            "1",
        ],
    )
    try:
        main()
    except SystemExit as exc:
        assert not exc.code
    assert sorted(p.name for p in repo.iterdir()) == [
        "maskattn_sdxl",
        "maskattn_text_encoder",
        "maskattn_text_encoder_2",
        "maskattn_unet",
        "maskattn_vae_decoder",
    ]
    unet = repo / "maskattn_unet" / "1" / "model.onnx"
    assert unet.stat().st_ino == (export_dir / "unet" / "model.onnx").stat().st_ino  # a hard link
    work = tmp_path / "work"
    work.mkdir()
    with TritonServer(repo, Endpoints(http_port=0, grpc_port=0, metrics_port=0), work) as server:
        server.wait_ready(600)
        conn = connect(server.endpoints.http_url)
        try:
            served = generate(conn, Request(PROMPTS[1], seed=4, steps=2, **SIZE))
        finally:
            conn.close()
    expected = reference.generate(
        GenerateConfig(PROMPTS[1], steps=2, seed=4, **SIZE), progress=False
    )
    assert np.array_equal(pixels(served.image), pixels(expected.images[0]))
    assert served.settings == {**expected.settings, "image_index": 0, "warnings": []}
