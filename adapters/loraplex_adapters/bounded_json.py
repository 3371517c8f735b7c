"""JSON from outside (configs, manifests, metrics, safetensors headers) parsed with bounds.

json.loads recurses once per nesting level, so a deep document raises RecursionError, and huge
integers raise ValueError: both become AdapterFormatError here, and documents nested deeper than
`max_depth` are refused even when Python could parse them.
"""

from __future__ import annotations

import json

from .format_errors import AdapterFormatError

MAX_DEPTH = 32


def _no_constants(name: str):
    raise ValueError(f"{name} is not a JSON number (numbers must be finite)")


def loads_bounded(data: str | bytes, what: str, max_depth: int = MAX_DEPTH, finite: bool = False) -> object:
    """Parse `data`; raises AdapterFormatError naming `what` when it is not JSON or nests too deep, or (with
    `finite`, for client input) holds NaN or Infinity, which standard JSON does not have."""
    try:
        value = json.loads(data, parse_constant=_no_constants) if finite else json.loads(data)
    except RecursionError:
        raise AdapterFormatError(f"{what} is nested too deeply (at most {max_depth} levels)") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, an integer with too many digits
        raise AdapterFormatError(f"{what} is not valid JSON ({exc})") from None
    if nesting_depth(value) > max_depth:
        raise AdapterFormatError(f"{what} is nested too deeply (at most {max_depth} levels)")
    return value


def nesting_depth(value: object) -> int:
    """Levels of objects and arrays (a scalar is 0), walked without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in children)
    return deepest
