"""``maskattn-deploy env``: versions, devices and which backends are usable here (and why not)."""

from __future__ import annotations

import json
import platform
from importlib import metadata

import click

from maskattn_deploy._lazy import available, install_hint

PACKAGES = {
    "torch": "torch",
    "diffusers": "diffusers",
    "transformers": "transformers",
    "onnx": "onnx",
    "onnxruntime": None,  # onnxruntime or onnxruntime-gpu
    "tensorrt": None,
    "triton": "triton",
    "polygraphy": "polygraphy",
    "accelerate": "accelerate",
}


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def package_versions() -> dict[str, str | None]:
    versions = {"python": platform.python_version()}
    for name, dist in PACKAGES.items():
        candidates = (
            [dist]
            if dist
            else {
                "onnxruntime": ["onnxruntime", "onnxruntime-gpu"],
                "tensorrt": [
                    "tensorrt",
                    "tensorrt-cu12",
                    "tensorrt-cu13",
                    "tensorrt-cu12-bindings",
                ],
            }[name]
        )
        versions[name] = next((v for c in candidates if (v := _version(c))), None)
    return versions


def cuda_info() -> dict[str, object]:
    import torch

    info: dict[str, object] = {
        "torch_cuda_build": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        major, minor = torch.cuda.get_device_capability(0)
        info["compute_capability"] = f"{major}.{minor}"
    return info


def backend_status(cuda: bool) -> dict[str, str]:
    """backend -> 'usable (...)' or 'not usable: why - fix'."""
    status = {"torch": "usable (reference; CUDA)" if cuda else "usable (reference; CPU)"}
    if available("onnxruntime"):
        import onnxruntime as ort

        providers = ort.get_available_providers()
        status["onnxruntime"] = f"usable ({', '.join(providers)})"
    else:
        status["onnxruntime"] = f"not installed - {install_hint('onnxruntime')}"
    if not available("tensorrt"):
        status["tensorrt"] = f"not installed - {install_hint('tensorrt')}"
    elif not cuda:
        status["tensorrt"] = "installed but no CUDA GPU is visible - engines need an NVIDIA GPU"
    else:
        status["tensorrt"] = "usable"
    if not available("triton"):
        status["triton-kernel"] = f"not installed - {install_hint('triton')}"
    else:
        status["triton-kernel"] = (
            "usable (CUDA)"
            if cuda
            else "CPU: reference fallback (kernel needs a CUDA GPU; TRITON_INTERPRET=1 for tests)"
        )
    return status


@click.command("env")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def command(as_json: bool) -> None:
    """Show versions, devices and which backends are usable here."""
    versions = package_versions()
    cuda = cuda_info()
    backends = backend_status(bool(cuda["cuda_available"]))
    if as_json:
        click.echo(json.dumps({"versions": versions, "cuda": cuda, "backends": backends}, indent=2))
        return
    click.echo("versions")
    for name, version in versions.items():
        click.echo(f"  {name:<13} {version or 'not installed'}")
    click.echo("devices")
    for key, value in cuda.items():
        click.echo(f"  {key:<18} {value}")
    click.echo("backends")
    for name, state in backends.items():
        click.echo(f"  {name:<13} {state}")
