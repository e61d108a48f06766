"""The ``torch`` backend: diffusers modules (gate processors installed) behind the component contract.

It is the reference every other backend is compared with. Each runner takes the exact feed an
exported component takes (same names, shapes and meaning, see
:mod:`maskattn_deploy.export.spec`) so parity checks can hand identical inputs to torch, ONNX
Runtime and TensorRT. The VAE always runs in fp32 (the fp16 SDXL VAE overflows).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from maskattn_deploy.runtime.base import Backend, ComponentRunner, Feed, as_tensor

log = logging.getLogger(__name__)


class TorchComponentRunner(ComponentRunner):
    """Runs one diffusers / transformers module with the export's I/O contract."""

    def __init__(
        self,
        component: str,
        module: torch.nn.Module,
        device: torch.device,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__(component)
        self.module = module
        self.device = device
        self.dtype = torch.float32 if component.startswith("vae") else dtype

    def _activate(self) -> None:
        param = next(self.module.parameters())
        if param.device != self.device or param.dtype != self.dtype:
            self.module.to(device=self.device, dtype=self.dtype)
        self.module.eval()

    def _deactivate(self) -> None:
        pass  # the weights belong to the caller's pipeline; nothing to free

    def describe(self) -> str:
        return f"torch {str(self.dtype).removeprefix('torch.')} on {self.device}"

    def _float(self, value: Any) -> torch.Tensor:
        return as_tensor(value).to(self.device, self.dtype)

    def _infer(self, feed: Feed) -> dict[str, torch.Tensor]:
        with torch.inference_mode():
            return getattr(self, f"_run_{self.component}")(feed)

    def _run_unet(self, feed: Feed) -> dict[str, torch.Tensor]:
        out = self.module(
            self._float(feed["sample"]),
            as_tensor(feed["timestep"]).to(self.device, torch.float32),
            encoder_hidden_states=self._float(feed["encoder_hidden_states"]),
            added_cond_kwargs={
                "text_embeds": self._float(feed["text_embeds"]),
                "time_ids": self._float(feed["time_ids"]),
            },
            return_dict=False,
        )[0]
        return {"out_sample": out}

    def _encode(self, feed: Feed) -> Any:
        ids = as_tensor(feed["input_ids"]).to(self.device, torch.long)
        return self.module(ids, output_hidden_states=True)

    def _run_text_encoder(self, feed: Feed) -> dict[str, torch.Tensor]:
        # SDXL conditions on the penultimate layer of both CLIP encoders.
        return {"hidden_states": self._encode(feed).hidden_states[-2]}

    def _run_text_encoder_2(self, feed: Feed) -> dict[str, torch.Tensor]:
        out = self._encode(feed)
        return {"hidden_states": out.hidden_states[-2], "text_embeds": out.text_embeds}

    def _run_vae_decoder(self, feed: Feed) -> dict[str, torch.Tensor]:
        latents = as_tensor(feed["latent_sample"]).to(self.device, torch.float32)
        return {"sample": self.module.decode(latents, return_dict=False)[0]}

    def _run_vae_encoder(self, feed: Feed) -> dict[str, torch.Tensor]:
        images = as_tensor(feed["sample"]).to(self.device, torch.float32)
        return {"latent_sample": self.module.encode(images).latent_dist.mean}


class TorchBackend(Backend):
    """A diffusers SDXL pipeline as a backend; ``gates`` is the installed GateSet or None."""

    def __init__(
        self,
        pipe: Any,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        from maskattn_deploy.gating import installed_gates

        device = torch.device(device)
        modules = {
            "text_encoder": pipe.text_encoder,
            "text_encoder_2": pipe.text_encoder_2,
            "unet": pipe.unet,
            "vae_decoder": pipe.vae,
        }
        runners = {
            name: TorchComponentRunner(name, module, device, dtype)
            for name, module in modules.items()
        }
        super().__init__("torch", runners, device)
        self.pipe = pipe
        self.gates = installed_gates(pipe.unet)


def torch_backend(
    pipe: Any, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> TorchBackend:
    """The torch backend for a loaded diffusers pipeline (install gates on ``pipe.unet`` first)."""
    return TorchBackend(pipe, device, dtype)
