"""Validation of values where the library receives them, with messages that name the field.

Two kinds of input pass through here:

* fields of structured files (``gates.json``, a reference ``gate_final.pt``): :class:`Fields`
  reads one field at a time and raises the caller's error type with the file and the dotted
  field name, e.g. ``ck/gates.json: field 'config.hidden_dim' must be an integer > 0, got
  'abc'``;
* numeric parameters of library calls (steps, guidance, seed, sizes): :func:`check_int` and
  :func:`check_float` raise :class:`~maskattn_deploy.errors.InvalidValueError`, which is both a
  ``UserError`` (the CLI prints one line and exits 2) and a ``ValueError`` (what Python
  callers expect), naming the parameter and the allowed range.

JSON numbers arrive as ``int``/``float``; ``bool`` is a subclass of ``int`` in Python and is
refused wherever a number is expected, so ``"hidden_dim": true`` is not read as 1.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from maskattn_deploy.errors import InvalidValueError, UserError

_MISSING = object()


def _show(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _range_text(
    low: float | None,
    high: float | None,
    above: float | None = None,
    below: float | None = None,
) -> str:
    lower = f">= {low:g}" if low is not None else (f"> {above:g}" if above is not None else "")
    upper = f"<= {high:g}" if high is not None else (f"< {below:g}" if below is not None else "")
    if low is not None and high is not None:
        return f"in {low:g}..{high:g}" if isinstance(low, float) else f"in {low}..{high}"
    if lower and upper:
        return f"{lower} and {upper}"
    return lower or upper


def _invalid(name: str, message: str) -> InvalidValueError:
    """The error, naming ``name`` as a parameter when it is one (the CLI shows its flag)."""
    return InvalidValueError(message, params=(name,) if name.isidentifier() else ())


def check_int(
    name: str, value: Any, low: int | None = None, high: int | None = None, hint: str = ""
) -> int:
    """``value`` as an int within [low, high] (inclusive), or InvalidValueError naming ``name``."""
    bounds = _range_text(low, high)
    wanted = f"an integer {bounds}".rstrip()
    if not is_int(value):
        raise _invalid(name, f"{name} must be {wanted}, got {_show(value)}{hint}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise _invalid(name, f"{name} must be {wanted}, got {value}{hint}")
    return int(value)


def check_float(
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    hint: str = "",
    above: float | None = None,
    below: float | None = None,
) -> float:
    """``value`` as a finite float in [low, high] (``above``/``below``: exclusive bounds);
    NaN and +-inf are refused."""
    wanted = f"a finite number {_range_text(low, high, above, below)}".rstrip()
    if not is_number(value):
        raise _invalid(name, f"{name} must be {wanted}, got {_show(value)}{hint}")
    number = float(value)
    bad = not math.isfinite(number)
    bad = bad or (low is not None and number < low) or (high is not None and number > high)
    bad = bad or (above is not None and number <= above)
    bad = bad or (below is not None and number >= below)
    if bad:
        raise _invalid(name, f"{name} must be {wanted}, got {number:g}{hint}")
    return number


class Fields:
    """Typed access to the fields of one structured file, for one-line errors.

    ``where`` names the file, ``error`` is the exception type to raise (a ``UserError``),
    ``hint`` ends every message (how to get a good file). Nested sections get their own
    reader through :meth:`section`, so messages carry the dotted path of the field.
    """

    def __init__(
        self,
        data: Any,
        where: str,
        error: type[UserError],
        hint: str = "",
        prefix: str = "",
    ) -> None:
        self.where, self.error, self.hint, self.prefix = where, error, hint, prefix
        if not isinstance(data, Mapping):
            what = f"field {prefix.rstrip('.')!r}" if prefix else "the top level"
            self.fail(f"{what} must be a mapping (JSON object), got {_type_name(data)}")
        self.data = data

    def fail(self, message: str) -> None:
        raise self.error(f"{self.where}: {message}{self.hint}")

    def name(self, key: str) -> str:
        return f"{self.prefix}{key}"

    def _get(self, key: str, required: bool) -> Any:
        value = self.data.get(key, _MISSING)
        if value is _MISSING or value is None:
            if required:
                state = "missing" if value is _MISSING else "null"
                self.fail(f"field {self.name(key)!r} is {state}")
            return _MISSING
        return value

    def _wrong(self, key: str, wanted: str, value: Any) -> None:
        self.fail(
            f"field {self.name(key)!r} must be {wanted}, got {_type_name(value)} {_show(value)}"
        )

    def text(self, key: str, required: bool = True, default: Any = None) -> Any:
        value = self._get(key, required)
        if value is _MISSING:
            return default
        if not isinstance(value, str):
            self._wrong(key, "a string", value)
        return value

    def choice(self, key: str, choices: tuple[str, ...] | Mapping[str, Any], **kw: Any) -> Any:
        value = self.text(key, **kw)
        if value is not None and value not in choices:
            self.fail(
                f"field {self.name(key)!r} is {value!r}; expected one of {', '.join(choices)}"
            )
        return value

    def flag(self, key: str, required: bool = True, default: Any = None) -> Any:
        value = self._get(key, required)
        if value is _MISSING:
            return default
        if not isinstance(value, bool):
            self._wrong(key, "true or false", value)
        return value

    def integer(
        self, key: str, low: int | None = None, required: bool = True, default: Any = None
    ) -> Any:
        value = self._get(key, required)
        if value is _MISSING:
            return default
        if not is_int(value) or (low is not None and value < low):
            self._wrong(key, f"an integer {_range_text(low, None)}".rstrip(), value)
        return value

    def number(
        self,
        key: str,
        low: float | None = None,
        high: float | None = None,
        required: bool = True,
        default: Any = None,
        allow_inf: bool = False,
    ) -> Any:
        """A float; NaN is always refused, +-inf only with ``allow_inf``."""
        value = self._get(key, required)
        if value is _MISSING:
            return default
        ok = is_number(value) and not math.isnan(value)
        ok = ok and (allow_inf or math.isfinite(value))
        ok = ok and (low is None or value >= low) and (high is None or value <= high)
        if not ok:
            kind = "a number" if allow_inf else "a finite number"
            self._wrong(key, f"{kind} {_range_text(low, high)}".rstrip(), value)
        return float(value)

    def mapping(self, key: str, required: bool = True) -> dict[str, Any] | None:
        value = self._get(key, required)
        if value is _MISSING:
            return None
        if not isinstance(value, Mapping):
            self._wrong(key, "a mapping (JSON object)", value)
        return dict(value)

    def section(self, key: str, required: bool = True) -> Fields | None:
        value = self._get(key, required)
        if value is _MISSING:
            return None
        return Fields(value, self.where, self.error, self.hint, f"{self.name(key)}.")

    def str_map(self, key: str, required: bool = True, nonempty: bool = False) -> dict[str, str]:
        """A mapping of strings to strings."""
        value = self.mapping(key, required)
        if value is None:
            return {}
        for k, v in value.items():
            if not isinstance(k, str) or not isinstance(v, str):
                self.fail(
                    f"field {self.name(key)!r} must map strings to strings; entry {_show(k)}: "
                    f"{_type_name(v)} {_show(v)}"
                )
        if nonempty and not value:
            self.fail(f"field {self.name(key)!r} is empty")
        return value

    def str_list(self, key: str, required: bool = True, nonempty: bool = False) -> list[str]:
        value = self._get(key, required)
        if value is _MISSING:
            return []
        if not isinstance(value, (list, tuple)):
            self._wrong(key, "a list of strings", value)
        for i, item in enumerate(value):
            if not isinstance(item, str):
                self.fail(
                    f"field '{self.name(key)}[{i}]' must be a string, got {_type_name(item)} "
                    f"{_show(item)}"
                )
        if nonempty and not value:
            self.fail(f"field {self.name(key)!r} is empty")
        return list(value)
