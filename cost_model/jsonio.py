"""JSON round trips of frozen dataclasses (``ModelSpec``, ``HardwareProfile``, ``Policy``).

Torch-free. ``from_dict`` rejects unknown keys by name; missing required keys surface as the
dataclass constructor's ``TypeError``. Field conversions (JSON list <-> tuple) are per class.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
Convert = dict[str, Callable[[Any], Any]]  # field name -> conversion of its value


def dataclass_to_dict(obj: Any, convert: Convert | None = None) -> dict[str, Any]:
    """``asdict(obj)`` with ``convert`` applied to the named fields."""
    d = asdict(obj)
    for name, fn in (convert or {}).items():
        d[name] = fn(d[name])
    return d


def dataclass_from_dict(cls: type[T], d: dict[str, Any], what: str | None = None,
                        convert: Convert | None = None) -> T:
    """``cls(**d)``; ValueError "unknown <what> fields: [...]" for keys that are not fields.

    ``what`` defaults to the class name; ``convert`` applies to the named fields present in ``d``.
    """
    unknown = set(d) - set(cls.__dataclass_fields__)  # type: ignore[attr-defined]
    if unknown:
        raise ValueError(f"unknown {what or cls.__name__} fields: {sorted(unknown)}")
    d = dict(d)
    for name, fn in (convert or {}).items():
        if name in d:
            d[name] = fn(d[name])
    return cls(**d)


def save_json(data: Any, path: str | Path) -> None:
    """``data`` as indented JSON plus a trailing newline."""
    Path(path).write_text(json.dumps(data, indent=2) + "\n")


def load_json(path: str | Path, error: str = "cannot read {path!r}: {exc}") -> Any:
    """The parsed JSON in ``path``; ValueError if it cannot be read or is not valid JSON.

    The message is ``error`` formatted with ``path`` (as a str) and ``exc``.
    """
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(error.format(path=str(path), exc=exc)) from None
