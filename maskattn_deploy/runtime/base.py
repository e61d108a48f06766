"""The backend interface: one runner per pipeline component, Polygraphy-style.

A *component runner* runs one exported component (``unet``, ``text_encoder``,
``text_encoder_2``, ``vae_decoder``) on a feed keyed by the tensor names of
:mod:`maskattn_deploy.export.spec`, and returns a dict of torch tensors keyed by the output
names. Its lifecycle is ``activate()`` (load sessions / engines / weights), ``infer(feed)`` any
number of times, ``deactivate()`` (free them).

A :class:`Backend` is a named set of component runners plus the device its outputs live on.
``backend.run("unet", feed)`` activates the runner on first use, so callers never manage the
lifecycle by hand; ``with backend:`` (or ``backend.release()``) frees everything. The pipeline
only talks to this interface, so every backend runs the exact same pipeline code.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from maskattn_deploy.errors import UserError
from maskattn_deploy.export.component_spec import COMPONENT_IO

log = logging.getLogger(__name__)

BACKENDS: tuple[str, ...] = ("onnxruntime", "torch", "tensorrt")
PIPELINE_COMPONENTS: tuple[str, ...] = ("text_encoder", "text_encoder_2", "unet", "vae_decoder")

Feed = Mapping[str, "np.ndarray | torch.Tensor"]


class UnknownBackendError(UserError):
    """The backend name is not one of :data:`BACKENDS`."""


def check_backend_name(name: str) -> str:
    """Return ``name`` if it is a known backend, else raise a one-line :class:`UserError`."""
    if name not in BACKENDS:
        raise UnknownBackendError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return name


def as_tensor(value: np.ndarray | torch.Tensor) -> torch.Tensor:
    """A torch view of ``value`` (numpy arrays are wrapped without a copy where possible)."""
    if isinstance(value, torch.Tensor):
        return value
    return torch.from_numpy(np.ascontiguousarray(value))


def as_numpy(value: np.ndarray | torch.Tensor, dtype: np.dtype | None = None) -> np.ndarray:
    """A contiguous host array of ``value``, cast to ``dtype`` when given."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    array = np.ascontiguousarray(value)
    return array if dtype is None or array.dtype == dtype else array.astype(dtype)


class ComponentRunner(abc.ABC):
    """Runs one component. Subclasses implement :meth:`_activate`, :meth:`_infer`, :meth:`_deactivate`."""

    def __init__(self, component: str, outputs: Sequence[str] | None = None) -> None:
        """``outputs``: the outputs to return (default: the spec's, which the text encoders
        must name: theirs depend on the model's depth, see ``runtime_outputs``)."""
        if component not in COMPONENT_IO:
            raise UserError(f"unknown component {component!r}; known: {', '.join(COMPONENT_IO)}")
        self.component = component
        self.input_names, self.output_names = COMPONENT_IO[component]
        if outputs is not None:
            self.output_names = tuple(outputs)
        self.active = False

    def activate(self) -> ComponentRunner:
        if not self.active:
            self._activate()
            self.active = True
        return self

    def deactivate(self) -> None:
        if self.active:
            self._deactivate()
            self.active = False

    def infer(self, feed: Feed) -> dict[str, torch.Tensor]:
        """Run on ``feed`` (every input name of the component) and return every output."""
        missing = [name for name in self.input_names if name not in feed]
        if missing:
            raise UserError(
                f"{self.component}: missing inputs {', '.join(missing)} "
                f"(expected {', '.join(self.input_names)})"
            )
        self.activate()
        return self._infer({name: feed[name] for name in self.input_names})

    def describe(self) -> str:
        """One short line for logs and the timing report (provider, engine, dtype...)."""
        return type(self).__name__

    @abc.abstractmethod
    def _activate(self) -> None: ...

    @abc.abstractmethod
    def _infer(self, feed: Feed) -> dict[str, torch.Tensor]: ...

    @abc.abstractmethod
    def _deactivate(self) -> None: ...


class Backend:
    """A named set of component runners whose outputs live on ``device``."""

    def __init__(
        self, name: str, runners: Mapping[str, ComponentRunner], device: torch.device | str = "cpu"
    ) -> None:
        self.name = name
        self.runners = dict(runners)
        self.device = torch.device(device)

    @property
    def components(self) -> list[str]:
        return list(self.runners)

    def runner(self, component: str) -> ComponentRunner:
        try:
            return self.runners[component]
        except KeyError:
            raise UserError(
                f"the {self.name} backend has no {component!r} component "
                f"(it has {', '.join(self.runners) or 'none'})"
            ) from None

    def run(self, component: str, feed: Feed) -> dict[str, torch.Tensor]:
        """Run one component on ``feed`` (activating its runner on first use)."""
        return self.runner(component).infer(feed)

    def activate(self, components: Iterable[str] | None = None) -> Backend:
        """Load the runners now (otherwise they load on first use)."""
        for name in components or self.runners:
            self.runner(name).activate()
        return self

    def release(self) -> None:
        """Deactivate every runner (sessions, engines and buffers are freed)."""
        for runner in self.runners.values():
            runner.deactivate()

    deactivate = release

    def synchronize(self) -> None:
        """Wait for queued device work so that wall-clock timings are honest."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def describe(self) -> dict[str, str]:
        return {name: runner.describe() for name, runner in self.runners.items()}

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"Backend({self.name!r}, components={self.components}, device={self.device})"
