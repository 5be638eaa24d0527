"""Values typed by a user (``--set section.key=value``) or read from YAML, checked against a section's field types.

A ``--set`` value stays text until the field's type is known, so ``none`` is a string for a plain ``str`` field
and a run id such as ``0123`` is not read as a number; lists become tuples and ints become floats where the
field says so. Unknown keys are refused with the list of valid ones.
"""

from __future__ import annotations

import types
import typing
from dataclasses import dataclass, fields, replace
from typing import Any

import yaml

from vggdist.config.sections import ConfigError, _check


@dataclass(frozen=True)
class Raw:
    """A --set value as typed: parsed only once the field's type is known ('none' is a string for a str field)."""

    text: str


def parse_value(raw: str) -> Any:
    """'0.005' -> 0.005, '256,512' -> [256, 512], 'none'/'null' -> None, 'true' -> True; YAML scalars otherwise."""
    if raw.lower() in ("none", "null", "~", ""):
        return None
    if "," in raw and not raw.startswith("["):
        return [parse_value(p.strip()) for p in raw.split(",")]
    for number in (int, float):  # YAML 1.1 reads "1e-3" as a string; Python reads it as the number meant
        try:
            return number(raw)
        except ValueError:
            pass
    return yaml.safe_load(raw)


def replace_checked(section: Any, section_name: str, values: dict[str, Any]) -> Any:
    hints = typing.get_type_hints(type(section))
    known = {f.name for f in fields(section)}
    unknown = set(values) - known
    _check(
        not unknown,
        f"unknown key(s) {sorted(f'{section_name}.{k}' for k in unknown)}; valid: {sorted(known)}",
    )
    coerced = {k: coerce(v, hints[k], f"{section_name}.{k}") for k, v in values.items()}
    try:
        return replace(section, **coerced)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:  # pragma: no cover - defensive
        raise ConfigError(f"{section_name}: {e}") from e


def coerce(value: Any, hint: Any, name: str) -> Any:
    """Check `value` against the field's type hint; convert lists to tuples and ints to floats where the field says so."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if isinstance(value, Raw):
        if hint is str:  # a plain string field takes the text as typed, "none" included
            return value.text
        optional_str = origin in (typing.Union, types.UnionType) and str in args
        if optional_str and value.text.lower() not in ("none", "null", "~", ""):
            return value.text  # e.g. a run id such as 0123 or 1e10 stays a string
        value = parse_value(value.text)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            _check(type(None) in args, f"{name} cannot be none")
            return None
        inner = [a for a in args if a is not type(None)]
        return coerce(value, inner[0], name)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            value = [value]
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(coerce(v, args[0], name) for v in value)
        _check(len(value) == len(args), f"{name} needs {len(args)} values separated by commas, got {value!r}")
        return tuple(coerce(v, a, name) for v, a in zip(value, args, strict=True))
    if hint is bool:
        _check(isinstance(value, bool), f"{name} must be true or false, got {value!r}")
        return value
    if hint is int:
        _check(
            isinstance(value, int) and not isinstance(value, bool),
            f"{name} must be an integer, got {value!r}",
        )
        return value
    if hint is float:
        _check(
            isinstance(value, (int, float)) and not isinstance(value, bool),
            f"{name} must be a number, got {value!r}",
        )
        return float(value)
    if hint is str:
        _check(isinstance(value, str), f"{name} must be a string, got {value!r}")
        return value
    return value
