"""A stand-in for TensorRT's native extension, just enough to run NVIDIA's ``tensorrt.plugin``.

``tensorrt.plugin`` ships as Python source inside the bindings wheels on PyPI, on top of the
compiled ``tensorrt`` extension (which needs NVIDIA's libraries and a GPU). :func:`install`
puts this module in ``sys.modules`` as ``tensorrt`` with the wheel's source folder on its
``__path__``, so ``import tensorrt.plugin`` runs NVIDIA's real registration, validation and
plugin classes. What is stubbed is the native layer only: enums, plain value classes, a plugin
registry (a dict) and an expression builder that *evaluates* the integer expressions the plugin
builds, so its grid, block, shared memory and scalar arguments can be checked against real
shapes. A dimension is either a build-time constant or not (``is_constant``), as in TensorRT;
a non-constant one still carries the value it would have at run time.

Nothing here executes kernels or pretends to build an engine.
"""

from __future__ import annotations

import enum
import sys
import types
from pathlib import Path
from typing import Any

_MAX_DIMS = 8


def _enum(name: str, *members: str) -> type[enum.Enum]:
    """An enum like TensorRT's pybind11 ones (members compare by identity, have ``.name``)."""
    return enum.Enum(name, {m: i for i, m in enumerate(members)})


DataType = _enum("DataType", "FLOAT", "HALF", "INT8", "INT32", "BOOL", "UINT8", "FP8", "BF16",
                 "INT64", "INT4", "FP4")  # fmt: skip
TensorFormat = _enum("TensorFormat", "LINEAR", "CHW2", "HWC8", "CHW4", "CHW16", "CHW32", "HWC")
PluginFieldType = _enum("PluginFieldType", "FLOAT16", "FLOAT32", "FLOAT64", "INT8", "INT16",
                        "INT32", "CHAR", "DIMS", "UNKNOWN", "BF16", "INT64", "FP8", "INT4")  # fmt: skip
DimensionOperation = _enum("DimensionOperation", "SUM", "PROD", "MAX", "MIN", "SUB", "EQUAL",
                           "LESS", "FLOOR_DIV", "CEIL_DIV")  # fmt: skip
PluginArgType = _enum("PluginArgType", "INT")
PluginArgDataType = _enum("PluginArgDataType", "INT8", "INT16", "INT32")
TensorRTPhase = _enum("TensorRTPhase", "BUILD", "RUNTIME")
QuickPluginCreationRequest = _enum("QuickPluginCreationRequest", "UNKNOWN", "PREFER_JIT",
                                   "PREFER_AOT", "STRICT_JIT", "STRICT_AOT")  # fmt: skip

float32, float16, int32 = DataType.FLOAT, DataType.HALF, DataType.INT32


class Logger:
    VERBOSE, INFO, WARNING, ERROR, INTERNAL_ERROR = range(5)

    def __init__(self, severity: int = 2) -> None:
        self.messages: list[str] = []

    def log(self, severity: int, message: str) -> None:
        self.messages.append(message)


class Dims(tuple):
    MAX_DIMS = _MAX_DIMS

    def __new__(cls, dims: Any = ()) -> Dims:
        return super().__new__(cls, [-1] * dims if isinstance(dims, int) else dims)


class IDimensionExpr:
    """An integer expression: its value, and whether TensorRT would know it at build time."""

    def __init__(self, value: int, constant: bool) -> None:
        self.value, self.constant = int(value), constant

    def is_constant(self) -> bool:
        return self.constant

    def get_constant_value(self) -> int:
        if not self.constant:
            raise RuntimeError("the stub refuses to read a non-constant dimension")
        return self.value

    def __repr__(self) -> str:
        return f"Dim({self.value}{'' if self.constant else ', dynamic'})"


_OPERATIONS = {
    "SUM": lambda a, b: a + b,
    "PROD": lambda a, b: a * b,
    "MAX": max,
    "MIN": min,
    "SUB": lambda a, b: a - b,
    "EQUAL": lambda a, b: int(a == b),
    "LESS": lambda a, b: int(a < b),
    "FLOOR_DIV": lambda a, b: a // b,
    "CEIL_DIV": lambda a, b: -(-a // b),
}


class IExprBuilder:
    """Evaluates as it builds: every expression knows its value."""

    def constant(self, value: int) -> IDimensionExpr:
        return IDimensionExpr(value, True)

    def operation(self, op: Any, a: IDimensionExpr, b: IDimensionExpr) -> IDimensionExpr:
        return IDimensionExpr(_OPERATIONS[op.name](a.value, b.value), a.constant and b.constant)

    def declare_size_tensor(self, *args: Any) -> IDimensionExpr:
        raise NotImplementedError("size tensors are not used by this plugin")


class DimsExprs(list):
    def __init__(self, n: int | list = 0) -> None:
        super().__init__([None] * n if isinstance(n, int) else n)


class ISymExpr:
    def __init__(self) -> None:
        pass


class PluginTensorDesc:
    def __init__(self) -> None:
        self.dims: Dims = Dims()
        self.type: Any = DataType.FLOAT
        self.format: Any = TensorFormat.LINEAR
        self.scale = 1.0


class DynamicPluginTensorDesc:
    def __init__(self) -> None:
        self.desc = PluginTensorDesc()
        self.min: Dims = Dims()
        self.opt: Dims = Dims()
        self.max: Dims = Dims()


class PluginField:
    def __init__(self, name: str = "", data: Any = None, type: Any = None) -> None:  # noqa: A002
        self.name, self.data, self.type = name, data, type


class PluginFieldCollection(list):
    pass


class _Interface:
    def __init__(self, *args: Any) -> None:
        pass


class IPluginV3(_Interface): ...


class IPluginV3QuickCore(_Interface): ...


class IPluginV3QuickBuild(_Interface): ...


class IPluginV3QuickRuntime(_Interface): ...


class IPluginV3QuickAOTBuild(_Interface): ...


class IPluginCreatorV3Quick(_Interface): ...


class ITensor: ...


class _Registry:
    def __init__(self) -> None:
        self.creators: dict[tuple[str, str, str], Any] = {}

    def register_creator(self, creator: Any, namespace: str) -> bool:
        key = (creator.name, creator.plugin_version, namespace)
        if key in self.creators:
            return False
        self.creators[key] = creator
        return True

    def get_creator(self, name: str, version: str, namespace: str = "") -> Any:
        return self.creators.get((name, version, namespace))


_REGISTRY = _Registry()


def get_plugin_registry() -> _Registry:
    return _REGISTRY


def nptype(dtype: Any) -> Any:
    import numpy as np

    return {DataType.FLOAT: np.float32, DataType.HALF: np.float16, DataType.INT32: np.int32,
            DataType.INT8: np.int8, DataType.INT64: np.int64, DataType.BOOL: np.bool_}[dtype]  # fmt: skip


def install(bindings_dir: Path) -> types.ModuleType:
    """Make ``import tensorrt`` return this stub, with ``tensorrt.plugin`` from ``bindings_dir``.

    ``bindings_dir`` is the wheel's ``tensorrt_bindings`` folder (holding ``plugin/``). Earlier
    ``tensorrt`` modules are dropped, so each call starts with an empty plugin registry.
    """
    for name in [n for n in sys.modules if n == "tensorrt" or n.startswith("tensorrt.")]:
        del sys.modules[name]
    module = types.ModuleType("tensorrt")
    module.__dict__.update(
        {k: v for k, v in globals().items() if not k.startswith("__") and k != "install"}
    )
    module.__path__ = [str(bindings_dir)]
    module.__version__ = "stub"
    module._REGISTRY = _Registry()
    module.get_plugin_registry = lambda: module._REGISTRY
    sys.modules["tensorrt"] = module
    return module
