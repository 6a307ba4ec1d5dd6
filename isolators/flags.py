"""Reading isolator settings out of the agent's flags (`Settings.flags`), typed and checked.

Flags may arrive parsed (from the command line) or as text (from a file or a test); each
reader accepts both and raises ValueError naming the flag and what it accepts.
"""

from __future__ import annotations

import json
import math

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def flag_str(flags: dict, name: str, default: str) -> str:
    value = flags.get(name)
    if value is None:
        return default
    if not isinstance(value, str) or not value:
        raise ValueError(f"flag {name} must be a non-empty string, not {value!r}")
    return value


def flag_bool(flags: dict, name: str, default: bool) -> bool:
    value = flags.get(name)
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError(f"flag {name} must be true or false, not {value!r}")


def flag_float(flags: dict, name: str, default: float, minimum: float = 0.0) -> float:
    """A number greater than `minimum` (e.g. a positive interval in seconds)."""
    value = flags.get(name)
    if value is None:
        return default
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(value, bool) or not math.isfinite(number) or number <= minimum:
        raise ValueError(f"flag {name} must be a number above {minimum:g}, not {value!r}")
    return number


def flag_count(flags: dict, name: str) -> int | None:
    """A positive whole number, or None (no limit) when unset or 'max'."""
    value = flags.get(name)
    if value is None or value == "max":
        return None
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if isinstance(value, (bool, float)) or number <= 0:
        raise ValueError(f"flag {name} must be a positive whole number or 'max', not {value!r}")
    return number


def flag_json(flags: dict, name: str):
    """A JSON flag as Mesos takes it: parsed already, JSON text, or `file:///path` to read."""
    value = flags.get(name)
    if value is None or isinstance(value, (dict, list)):
        return value
    if not isinstance(value, str):
        raise ValueError(f"flag {name} must be JSON, not {value!r}")
    text = value
    if value.startswith("file://"):
        try:
            with open(value[len("file://"):]) as f:
                text = f.read()
        except OSError as e:
            raise ValueError(f"flag {name}: cannot read {value}: {e.strerror}") from None
    try:
        return json.loads(text)
    except ValueError as e:
        raise ValueError(f"flag {name} is not valid JSON: {e}") from None
