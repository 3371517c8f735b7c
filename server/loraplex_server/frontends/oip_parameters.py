"""Request parameters of an Open Inference Protocol generation -> the request path's SamplingInput.

Names and meaning follow Triton's generate extension (and our SamplingParameters): max_tokens,
temperature, top_p, top_k, seed, stop. `stop` is one stop string, or several as a JSON array of
strings (parsed with the bounded JSON parser: size and depth). Anything else is refused by name rather than
ignored.
"""

from __future__ import annotations

from loraplex_adapters.bounded_json import loads_bounded
from loraplex_server.api.errors import InvalidRequest
from loraplex_server.api.requests import SamplingInput

INTEGER = ("max_tokens", "top_k", "seed")
NUMBER = ("temperature", "top_p")
ACCEPTED = (*INTEGER, *NUMBER, "stop")
MAX_STOP_PARAMETER_CHARS = 4096


def sampling_input(parameters: dict[str, object]) -> SamplingInput:
    """The sampling values of the InferParameter choices as sent."""
    unknown = sorted(set(parameters) - set(ACCEPTED))
    if unknown:
        raise InvalidRequest(f"unknown request parameter {unknown[0]!r}; a generation takes {', '.join(ACCEPTED)}")
    arguments: dict = {}
    for name, value in parameters.items():
        if name in INTEGER:
            if not isinstance(value, int) or isinstance(value, bool):
                raise InvalidRequest(f"parameter {name} must be an integer (int64_param), got {value!r}")
            arguments[name] = value
        elif name in NUMBER:
            if not isinstance(value, int | float) or isinstance(value, bool):
                raise InvalidRequest(f"parameter {name} must be a number (double_param), got {value!r}")
            arguments[name] = float(value)
        else:
            arguments["stop"] = tuple(_stop_strings(value))
    return SamplingInput(**arguments)


def _stop_strings(value: object) -> list[str]:
    if not isinstance(value, str):
        raise InvalidRequest("parameter stop must be a string (string_param): one stop string, or a JSON array")
    if len(value) > MAX_STOP_PARAMETER_CHARS:
        raise InvalidRequest(f"parameter stop has {len(value)} characters; at most {MAX_STOP_PARAMETER_CHARS}")
    if not value.startswith("["):
        return [value]
    stops = loads_bounded(value, "parameter stop (a JSON array of strings)", max_depth=1)
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise InvalidRequest("parameter stop must be a JSON array of strings")
    return stops
