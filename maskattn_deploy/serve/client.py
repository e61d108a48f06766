"""Talk to a served pipeline with NVIDIA's ``tritonclient`` (HTTP or gRPC).

:func:`connect` makes a client, :func:`generate` sends one request
(:mod:`maskattn_deploy.serve.protocol` lists the fields) and returns a :class:`ServedImage`;
server errors become one-line :class:`ServeError` messages that say what to do: ``overloaded``
(the server's queue is full: retry later or add replicas), ``shutting down``, a refused value,
or no server at the URL.
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from maskattn_deploy._lazy import require
from maskattn_deploy.errors import UserError
from maskattn_deploy.serve.protocol import CLIENT_DTYPES, INPUTS, MODEL_NAME, NUMPY_DTYPES

OVERLOADED = "overloaded"


class ServeError(UserError):
    """The server refused or failed a request; ``kind`` says which way."""

    def __init__(self, message: str, kind: str = "error") -> None:
        super().__init__(message)
        self.kind = kind


@dataclass
class Request:
    """One served generation (None: the server's default)."""

    prompt: str
    negative_prompt: str | None = None
    seed: int | None = None
    steps: int | None = None
    guidance: float | None = None
    height: int | None = None
    width: int | None = None
    scheduler: str | None = None
    return_masks: bool = False

    def fields(self) -> dict[str, Any]:
        values = {
            "PROMPT": self.prompt,
            "NEGATIVE_PROMPT": self.negative_prompt,
            "SEED": self.seed,
            "STEPS": self.steps,
            "GUIDANCE": self.guidance,
            "HEIGHT": self.height,
            "WIDTH": self.width,
            "SCHEDULER": self.scheduler,
            "RETURN_MASKS": self.return_masks or None,
        }
        return {k: v for k, v in values.items() if v is not None}


@dataclass
class ServedImage:
    """What the server answered for one request."""

    image: Any  # PIL image (decoded from IMAGE_PNG)
    png: bytes
    settings: dict[str, Any]
    timings: dict[str, Any]
    gate_open: dict[str, float]
    masks: dict[str, np.ndarray] | None = None  # stage -> [t, h, w]
    tokens: list[str] = field(default_factory=list)
    latency_s: float = 0.0

    @property
    def warnings(self) -> list[str]:
        return list(self.settings.get("warnings", []))


def _module(protocol: str) -> Any:
    if protocol not in ("http", "grpc"):
        raise UserError(f"unknown protocol {protocol!r}; choose http or grpc")
    return require(f"tritonclient.{protocol}", "talking to a Triton server")


def connect(url: str, protocol: str = "http", timeout_s: float = 600.0) -> Any:
    """A tritonclient client for ``url`` (``host:port``; ``http://`` / ``grpc://`` accepted)."""
    for prefix in ("http://", "grpc://"):
        if url.startswith(prefix):
            protocol, url = prefix[:-3], url[len(prefix) :]
    module = _module(protocol)
    if protocol == "http":
        return module.InferenceServerClient(
            url, connection_timeout=timeout_s, network_timeout=timeout_s
        )
    return module.InferenceServerClient(url)


def _protocol(client: Any) -> str:
    return "grpc" if "grpc" in type(client).__module__ else "http"


def generate(client: Any, request: Request, outputs: tuple[str, ...] | None = None) -> ServedImage:
    """Send ``request``; raise :class:`ServeError` with the server's reason when refused."""
    module = _module(_protocol(client))
    inputs = []
    for name, value in request.fields().items():
        dtype = INPUTS[name][0]
        array = np.array([[value.encode() if isinstance(value, str) else value]])
        array = array.astype(NUMPY_DTYPES[dtype])
        tensor = module.InferInput(name, [1, 1], CLIENT_DTYPES[dtype])
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    wanted = outputs or (
        "IMAGE_PNG",
        "SETTINGS",
        "TIMINGS",
        "GATE_LAYERS",
        "GATE_OPEN_FRACTION",
        "TOKENS",
    ) + (("MASKS", "MASK_STAGES") if request.return_masks else ())
    requested = [module.InferRequestedOutput(name) for name in wanted]
    start = time.perf_counter()
    try:
        result = client.infer(MODEL_NAME, inputs, outputs=requested)
    except Exception as exc:  # tritonclient raises InferenceServerException and socket errors
        raise as_serve_error(exc, client) from None
    return _served(result, time.perf_counter() - start)


def _served(result: Any, latency: float) -> ServedImage:
    from PIL import Image

    def text(name: str) -> Any:
        value = result.as_numpy(name)
        return None if value is None else value.reshape(-1)

    png = bytes(text("IMAGE_PNG")[0]) if text("IMAGE_PNG") is not None else b""
    image = Image.open(io.BytesIO(png)) if png else None
    if image is not None:
        image.load()
    layers = [x.decode() for x in (text("GATE_LAYERS") if text("GATE_LAYERS") is not None else [])]
    fractions = text("GATE_OPEN_FRACTION")
    masks = None
    if result.as_numpy("MASKS") is not None and result.as_numpy("MASKS").size:
        stages = [s.decode() for s in text("MASK_STAGES")]
        masks = dict(zip(stages, result.as_numpy("MASKS")[0], strict=True))
    return ServedImage(
        image=image,
        png=png,
        settings=_json(text("SETTINGS")),
        timings=_json(text("TIMINGS")),
        gate_open={
            k: float(v)
            for k, v in zip(layers, fractions if fractions is not None else [], strict=True)
        },
        masks=masks,
        tokens=[t.decode() for t in (text("TOKENS") if text("TOKENS") is not None else [])],
        latency_s=latency,
    )


def _json(value: Any) -> dict[str, Any]:
    return json.loads(bytes(value[0])) if value is not None else {}


def as_serve_error(exc: BaseException, client: Any = None) -> ServeError:
    """One-line message and kind for anything tritonclient raised."""
    message = str(getattr(exc, "message", lambda: None)() or exc).strip()
    status = str(getattr(exc, "status", lambda: "")() or "")
    url = getattr(client, "_url", None) or getattr(client, "_parsed_url", None) or "the server"
    if "Exceeds maximum queue size" in message:
        return ServeError(
            f"overloaded: the server's queue is full ({message}); retry later, raise "
            "--max-queue, or add replicas",
            OVERLOADED,
        )
    if "shutting down" in message or "Server not ready" in message:
        return ServeError(f"the server is shutting down: {message}", "shutting_down")
    if "Connection refused" in message or "failed to connect" in message.lower():
        return ServeError(
            f"no server answers at {url}: start one with maskattn-deploy serve", "unreachable"
        )
    if "400" in status or "INVALID_ARG" in status or "[400]" in message or "unexpected" in message:
        return ServeError(f"the server refused the request: {message}", "invalid")
    return ServeError(f"the request failed: {type(exc).__name__}: {message}", "error")
