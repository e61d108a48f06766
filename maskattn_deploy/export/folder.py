"""An export folder as one typed object: open (validate, migrate), read, find its gates.

:meth:`ExportFolder.open` is the one reader of ``EXPORT_DIR/manifest.json``: the runtimes, the
engine builder, parity, bench and the demo all go through it. It checks that the folder and
the manifest exist and parse, that the format is one this version reads, migrates older
manifests in memory, and checks the keys and types every reader relies on; each problem is a
one-line :class:`ExportFolderError` that says what to do.

The manifest written by the exporter is :class:`ExportManifest`
(:meth:`ExportManifest.to_dict` is the JSON on disk).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from maskattn_deploy.errors import UserError
from maskattn_deploy.export.spec import (
    EXPORT_FORMAT,
    EXPORT_FORMAT_NAME,
    EXPORT_FORMAT_VERSION,
    MANIFEST_NAME,
)

if TYPE_CHECKING:
    from maskattn_deploy.export.recipe import ExportRecipe

REEXPORT = "re-run maskattn-deploy export"


class ExportFolderError(UserError):
    """An export folder is missing, incomplete, or does not match the requested model/gates."""


# --------------------------------------------------------------------------- entries


@dataclass
class ComponentEntry:
    """``components[name]``: the ONNX file and its I/O records (see the component spec)."""

    path: str  # relative to the export folder, POSIX separators
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    external_data: bool
    precision: str
    size_bytes: int
    gated_layers: list[str] | None = None  # the UNet's

    def to_dict(self) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "path": self.path,
            "inputs": self.inputs,
            "outputs": self.outputs,
            "external_data": self.external_data,
            "precision": self.precision,
            "size_bytes": self.size_bytes,
        }
        if self.gated_layers is not None:
            entry["gated_layers"] = self.gated_layers
        return entry


@dataclass
class ModelEntry:
    """``model``: what was exported (``spec`` is the model argument when it was a string)."""

    spec: str | None
    pipeline_class: str | None
    unet_fingerprint: str | None
    force_zeros_for_empty_prompt: bool | None = None
    vae_scaling_factor: float | None = None

    def to_dict(self) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "spec": self.spec,
            "pipeline_class": self.pipeline_class,
            "unet_fingerprint": self.unet_fingerprint,
        }
        if self.force_zeros_for_empty_prompt is not None:
            entry["force_zeros_for_empty_prompt"] = self.force_zeros_for_empty_prompt
        if self.vae_scaling_factor is not None:
            entry["vae_scaling_factor"] = self.vae_scaling_factor
        return entry


@dataclass
class GatesEntry:
    """``gates``: the checkpoint baked into the UNet (``path`` None when it was installed by a
    caller); ``threshold`` is a number or ``"-inf"`` / ``"inf"`` (JSON has no infinities)."""

    path: str | None
    sha256: str | None
    config: dict[str, Any]
    threshold: float | str
    num_parameters: int
    format: str | None = None
    step: int | None = None
    metadata: dict[str, Any] | None = None
    checkpoint: bool = True  # False: gates a caller installed (no format/step/metadata keys)

    @staticmethod
    def json_threshold(value: float) -> float | str:
        return value if math.isfinite(value) else str(value)

    def to_dict(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"path": self.path, "sha256": self.sha256}
        if self.checkpoint:
            entry["format"] = self.format
        entry |= {"config": self.config, "threshold": self.threshold}
        if self.checkpoint:
            entry |= {"step": self.step, "metadata": self.metadata}
        entry["num_parameters"] = self.num_parameters
        return entry


@dataclass
class ExportManifest:
    """``manifest.json`` of an export folder."""

    format: str
    created: str
    model: ModelEntry
    vae: dict[str, Any] | None
    gates: GatesEntry | None
    opset: int
    precision: str
    recipe: dict[str, Any]
    shapes: dict[str, Any]
    components: dict[str, ComponentEntry]
    gated_layers: list[str]
    plugin: dict[str, Any]
    tools: dict[str, Any]
    validation: dict[str, Any] | None
    files: dict[str, str] = field(default_factory=dict)
    file_sizes: dict[str, int] = field(default_factory=dict)  # bytes; absent in older exports

    @property
    def gates_sha256(self) -> str | None:
        """SHA-256 of the gate tensors baked into the export (None: ungated)."""
        return self.gates.sha256 if self.gates is not None else None

    def export_recipe(self) -> ExportRecipe:
        from maskattn_deploy.export.recipe import ExportRecipe

        return ExportRecipe.from_mapping(self.recipe)

    def component_precision(self, name: str) -> str:
        entry = self.components.get(name)
        return entry.precision if entry is not None else self.precision

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "created": self.created,
            "model": self.model.to_dict(),
            "vae": self.vae,
            "gates": self.gates.to_dict() if self.gates is not None else None,
            "gate_checkpoint_sha256": self.gates_sha256,
            "opset": self.opset,
            "precision": self.precision,
            "recipe": self.recipe,
            "shapes": self.shapes,
            "components": {k: v.to_dict() for k, v in self.components.items()},
            "gated_layers": self.gated_layers,
            "plugin": self.plugin,
            "tools": self.tools,
            "validation": self.validation,
            "files": self.files,
            "file_sizes": self.file_sizes,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = MANIFEST_NAME) -> ExportManifest:
        """Check the keys and types readers rely on (migrate older formats first)."""
        read = _Reader(data, where)
        gates = read.table("gates", optional=True)
        return cls(
            format=read.text("format"),
            created=str(data.get("created", "")),
            model=_model_entry(_Reader(read.table("model"), f"{where}: model")),
            vae=read.table("vae", optional=True),
            gates=_gates_entry(_Reader(gates, f"{where}: gates")) if gates is not None else None,
            opset=read.integer("opset"),
            precision=read.text("precision"),
            recipe=read.table("recipe"),
            shapes=read.table("shapes"),
            components={
                name: _component_entry(_Reader(entry, f"{where}: components.{name}"))
                for name, entry in read.table("components").items()
            },
            gated_layers=list(data.get("gated_layers") or []),
            plugin=dict(data.get("plugin") or {}),
            tools=dict(data.get("tools") or {}),
            validation=read.table("validation", optional=True),
            files=read.table("files", optional=True) or {},
            file_sizes=read.table("file_sizes", optional=True) or {},
        )


class _Reader:
    """Typed access to one table of the manifest; a wrong or missing key is a one-line error."""

    def __init__(self, data: Any, where: str) -> None:
        if not isinstance(data, Mapping):
            raise ExportFolderError(f"{where} is not a JSON object; {REEXPORT}")
        self.data, self.where = data, where

    def _get(self, key: str, kinds: tuple[type, ...], what: str, optional: bool) -> Any:
        value = self.data.get(key)
        if value is None and optional:
            return None
        if not isinstance(value, kinds) or isinstance(value, bool) and bool not in kinds:
            raise ExportFolderError(
                f"{self.where} has {'no' if value is None else 'a malformed'} {key!r} ({what} "
                f"expected); {REEXPORT}"
            )
        return value

    def text(self, key: str, optional: bool = False) -> Any:
        return self._get(key, (str,), "a string", optional)

    def integer(self, key: str, optional: bool = False) -> Any:
        return self._get(key, (int,), "an integer", optional)

    def flag(self, key: str, optional: bool = False) -> Any:
        return self._get(key, (bool,), "true or false", optional)

    def table(self, key: str, optional: bool = False) -> Any:
        value = self._get(key, (Mapping,), "an object", optional)
        return dict(value) if value is not None else None

    def items(self, key: str) -> list[Any]:
        return list(self._get(key, (list,), "a list", False))


def _component_entry(read: _Reader) -> ComponentEntry:
    layers = read.data.get("gated_layers")
    return ComponentEntry(
        path=read.text("path"),
        inputs=read.items("inputs"),
        outputs=read.items("outputs"),
        external_data=bool(read.data.get("external_data", False)),
        precision=read.text("precision"),
        size_bytes=int(read.data.get("size_bytes") or 0),
        gated_layers=list(layers) if layers is not None else None,
    )


def _model_entry(read: _Reader) -> ModelEntry:
    return ModelEntry(
        spec=read.text("spec", optional=True),
        pipeline_class=read.text("pipeline_class", optional=True),
        unet_fingerprint=read.text("unet_fingerprint", optional=True),
        force_zeros_for_empty_prompt=read.flag("force_zeros_for_empty_prompt", optional=True),
        vae_scaling_factor=read.data.get("vae_scaling_factor"),
    )


def _gates_entry(read: _Reader) -> GatesEntry:
    return GatesEntry(
        path=read.text("path", optional=True),
        sha256=read.text("sha256", optional=True),
        config=read.table("config", optional=True) or {},
        threshold=read.data.get("threshold", 0.0),
        num_parameters=int(read.data.get("num_parameters") or 0),
        format=read.text("format", optional=True),
        step=read.data.get("step"),
        metadata=read.table("metadata", optional=True),
        checkpoint="format" in read.data,
    )


# --------------------------------------------------------------------------- migration


def _v1_check(check: Mapping[str, Any]) -> dict[str, Any]:
    """A version-1 validation check (one scalar tolerance) in the version-2 record."""
    ok = bool(check.get("ok"))
    limit = check.get("tolerance")
    return {
        "component": check.get("component"),
        "output": check.get("output"),
        "point": check.get("point"),
        "max_abs": check.get("max_abs"),
        "mean_abs": None,
        "rel_l2": None,
        "cosine": None,
        "failures": [] if ok else [f"max abs {check.get('max_abs')} > {limit}"],
        "tolerance": {"atol": limit, "rtol": 0.0, "max_rel_l2": None, "min_cosine": None,
                      "reason": check.get("reason")},
        "ok": ok,
    }  # fmt: skip


def _from_v1(data: dict[str, Any]) -> dict[str, Any]:
    """Version 1 -> 2: validation checks became parity verdicts (element-wise, relative L2
    and cosine under the component's tolerance) instead of one max-abs bound."""
    validation = data.get("validation")
    if isinstance(validation, Mapping):
        data["validation"] = {
            name: {**entry, "checks": [_v1_check(c) for c in entry.get("checks") or []]}
            for name, entry in validation.items()
            if isinstance(entry, Mapping)
        }
    return data


# version N -> the function that turns a version-N manifest into version N + 1
MIGRATIONS: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {1: _from_v1}


def migrate(data: dict[str, Any], where: str = MANIFEST_NAME) -> dict[str, Any]:
    """``data`` in the current format (older versions migrated in order; newer refused)."""
    fmt = data.get("format")
    name, _, version = str(fmt).rpartition("/")
    if name != EXPORT_FORMAT_NAME or not version.isdigit():
        raise ExportFolderError(
            f"{where} has format {fmt!r}, not a maskattn-deploy export ({EXPORT_FORMAT!r}); "
            f"{REEXPORT}"
        )
    number = int(version)
    if number > EXPORT_FORMAT_VERSION:
        raise ExportFolderError(
            f"{where} was written by a newer maskattn-deploy (format {fmt}); upgrade "
            "maskattn-deploy or re-export with this version"
        )
    while number < EXPORT_FORMAT_VERSION:
        data = MIGRATIONS[number](dict(data))
        number += 1
        data["format"] = f"{EXPORT_FORMAT_NAME}/{number}"
    return data


# --------------------------------------------------------------------------- the folder


@dataclass
class ExportFolder:
    """An opened export folder: its path and its (current-format) manifest."""

    path: Path
    manifest: ExportManifest

    @staticmethod
    def exists(path: str | Path) -> bool:
        """True when ``path`` holds a manifest (cheap; :meth:`open` validates it)."""
        return (Path(path) / MANIFEST_NAME).is_file()

    @classmethod
    def open(cls, path: str | Path, verify: bool = True) -> ExportFolder:
        """Read, migrate and check ``path``; one-line :class:`ExportFolderError` otherwise.

        ``verify`` checks every file the manifest lists against its recorded size and SHA-256
        (hashed once per file version, see :mod:`maskattn_deploy.export.integrity`), so a
        corrupted or partly copied file is refused instead of giving wrong images.
        """
        folder = Path(path)
        if not folder.is_dir():
            raise ExportFolderError(
                f"export folder {folder} does not exist; create it with maskattn-deploy export"
            )
        file = folder / MANIFEST_NAME
        try:
            data = json.loads(file.read_text())
        except FileNotFoundError:
            raise ExportFolderError(
                f"{folder} is not an export folder (no {MANIFEST_NAME}); create one with "
                "maskattn-deploy export"
            ) from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ExportFolderError(f"{file} is unreadable ({exc}); {REEXPORT}") from exc
        if not isinstance(data, dict):
            raise ExportFolderError(f"{file} is not a JSON object; {REEXPORT}")
        manifest = ExportManifest.from_dict(migrate(data, str(file)), str(file))
        for name, entry in manifest.components.items():
            if not (folder / entry.path).is_file():
                raise ExportFolderError(f"{folder / entry.path} ({name}) is missing; {REEXPORT}")
        if verify:
            from maskattn_deploy.export.integrity import verify_files

            verify_files(folder, manifest.files, manifest.file_sizes, ExportFolderError)
        return cls(folder, manifest)

    def onnx_path(self, component: str) -> Path:
        entry = self.manifest.components.get(component)
        if entry is None:
            raise ExportFolderError(
                f"{self.path} has no {component}; exported: "
                f"{', '.join(self.manifest.components)} ({REEXPORT} to add it)"
            )
        return self.path / entry.path

    def recorded_sha256(self, relpath: str) -> str | None:
        """The SHA-256 the manifest records for a file of the folder (None if not recorded)."""
        return self.manifest.files.get(relpath)

    def find_gates(self, given: Path | None = None, model: str | None = None) -> Path | None:
        """The gate checkpoint this export was made with, or None when none is found.

        Candidates, in order: ``given``, the path the manifest records, ``EXPORT_DIR/gates``,
        and for the tiny model its seeded gates; only one whose hash matches the export's
        counts. An ungated export has no gates (None).
        """
        from maskattn_deploy.gating.checkpoint import read_checkpoint

        expected = self.manifest.gates_sha256
        if expected is None:
            return None
        candidates = [Path(given)] if given is not None else []
        recorded = self.manifest.gates.path if self.manifest.gates is not None else None
        if recorded:
            candidates.append(
                Path(recorded) if Path(recorded).is_absolute() else self.path / recorded
            )
        candidates.append(self.path / "gates")
        if (model or self.manifest.model.spec) == "tiny":
            from maskattn_deploy.models.tiny import tiny_default_gates_dir

            candidates.append(tiny_default_gates_dir())
        for candidate in candidates:
            if candidate.exists() and read_checkpoint(candidate).sha256 == expected:
                return candidate
        return None
