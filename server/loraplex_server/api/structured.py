"""Structured output on the request path: a client's constraint (a JSON schema, any JSON object, a regex,
or a choice among strings) bounded before any work, then compiled off the event loop and off the engine's
step thread, within a time limit, through a bounded cache (engine/grammar.py compiles).

Compile cost is what a hostile constraint attacks, so the size limits below are checked first (schema
bytes, nesting depth, properties, regex length and repetition bounds, choices), a compile runs on a small
pool of its own (so it never blocks the event loop or the step thread; xgrammar releases the GIL while it
compiles) with a time limit, and requests for a constraint being compiled share that one compile. The
largest compile the limits allow (a character class repeated 128 times) takes ~0.3 s on this CPU.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from loraplex_adapters.bounded_json import nesting_depth
from loraplex_server.api.errors import InvalidRequest
from loraplex_server.engine.engine import Engine
from loraplex_server.engine.grammar import KINDS, Constraint, GrammarCompiler

MAX_SCHEMA_BYTES = 32 << 10
MAX_SCHEMA_DEPTH = 16  # levels of JSON objects and arrays in the schema document
MAX_SCHEMA_PROPERTIES = 512  # property names over the whole schema
MAX_REGEX_CHARS = 1024
MAX_REGEX_REPEAT = 128  # the largest n in {n}, {n,} or {n,m}
MAX_REGEX_GROUP_DEPTH = 16
MAX_CHOICES = 256
MAX_CHOICE_CHARS = 256
COMPILE_SECONDS = 2.0
COMPILE_THREADS = 2

_REPEAT = re.compile(r"(?<!\\)\{\s*(\d+)\s*(?:,\s*(\d*)\s*)?\}")


@dataclass(frozen=True)
class StructuredInput:
    """A constraint as the client sent it: kind (json_schema, json_object, regex, choice) and its value (a
    schema as a dict or JSON text, a regex, a list of choices; None for json_object). `field` names it
    in refusals."""

    kind: str
    value: object = None
    field: str = "structured"


def constraint(structured: StructuredInput) -> Constraint:
    """The engine's constraint for `structured`, every size limit checked (InvalidRequest otherwise)."""
    kind, value, where = structured.kind, structured.value, structured.field
    if kind not in KINDS:
        raise InvalidRequest(f"{where}: the constraint kind must be one of {', '.join(KINDS)}", where)
    if kind == "json_object":
        return Constraint("json_object")
    if kind == "json_schema":
        return Constraint(kind, _schema_text(value, where))
    if kind == "regex":
        return Constraint(kind, _regex(value, where))
    return Constraint(kind, json.dumps(_choices(value, where), ensure_ascii=False))


def parsed_json(value: object, where: str, what: str, max_bytes: int) -> object:
    """`value`, parsed first when it is JSON text (refused past max_bytes before parsing)."""
    if not isinstance(value, str | bytes):
        return value
    if len(value) > max_bytes:
        raise InvalidRequest(f"{where}: {what} is over {max_bytes} bytes", where)
    try:
        return json.loads(value)
    except (RecursionError, ValueError):
        raise InvalidRequest(f"{where}: {what} is not valid JSON", where) from None


def _schema_text(value: object, where: str) -> str:
    value = parsed_json(value, where, "the JSON schema", MAX_SCHEMA_BYTES)
    if not isinstance(value, dict):
        raise InvalidRequest(f"{where}: the JSON schema must be a JSON object", where)
    if nesting_depth(value) > MAX_SCHEMA_DEPTH:
        raise InvalidRequest(f"{where}: the JSON schema nests deeper than {MAX_SCHEMA_DEPTH} levels", where)
    try:
        text = json.dumps(value, ensure_ascii=False, allow_nan=False)  # key order kept: properties come in it
    except ValueError:
        raise InvalidRequest(f"{where}: the JSON schema must hold finite numbers only", where) from None
    if len(text.encode()) > MAX_SCHEMA_BYTES:
        raise InvalidRequest(f"{where}: the JSON schema is over {MAX_SCHEMA_BYTES} bytes", where)
    if _count_properties(value, where) > MAX_SCHEMA_PROPERTIES:
        raise InvalidRequest(f"{where}: the JSON schema has more than {MAX_SCHEMA_PROPERTIES} properties", where)
    return text


def _count_properties(value: object, where: str) -> int:
    """Property names over the whole schema; every regex in it (`pattern`, `patternProperties` keys) is
    bounded like a regex constraint, as its compile cost is the same."""
    count, stack = 0, [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if isinstance(item.get("properties"), dict):
                count += len(item["properties"])
            if isinstance(item.get("pattern"), str):
                _regex(item["pattern"], where)
            if isinstance(item.get("patternProperties"), dict):
                for pattern in item["patternProperties"]:
                    _regex(pattern, where)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return count


def _regex(value: object, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidRequest(f"{where}: the regex must be a non-empty string", where)
    if len(value) > MAX_REGEX_CHARS:
        raise InvalidRequest(f"{where}: the regex has {len(value)} characters; at most {MAX_REGEX_CHARS}", where)
    for match in _REPEAT.finditer(value):
        if any(bound and int(bound) > MAX_REGEX_REPEAT for bound in match.groups()):
            raise InvalidRequest(f"{where}: a repetition bound in the regex is over {MAX_REGEX_REPEAT}", where)
    depth = deepest = 0
    for i, char in enumerate(value):
        if char in "()" and (i == 0 or value[i - 1] != "\\"):
            depth += 1 if char == "(" else -1
            deepest = max(deepest, depth)
    if deepest > MAX_REGEX_GROUP_DEPTH:
        raise InvalidRequest(f"{where}: the regex nests groups deeper than {MAX_REGEX_GROUP_DEPTH}", where)
    return value


def _choices(value: object, where: str) -> list[str]:
    if not isinstance(value, list | tuple) or not value:
        raise InvalidRequest(f"{where}: the choices must be a non-empty list of strings", where)
    if len(value) > MAX_CHOICES:
        raise InvalidRequest(f"{where}: {len(value)} choices; at most {MAX_CHOICES}", where)
    if not all(isinstance(c, str) and 1 <= len(c) <= MAX_CHOICE_CHARS for c in value):
        raise InvalidRequest(f"{where}: each choice must be a string of 1 to {MAX_CHOICE_CHARS} characters", where)
    return list(value)


# -- compiling ------------------------------------------------------------------------------------

_pool = ThreadPoolExecutor(COMPILE_THREADS, thread_name_prefix="loraplex-grammar")
_compilers: weakref.WeakKeyDictionary[Engine, GrammarCompiler] = weakref.WeakKeyDictionary()
_compilers_lock = threading.RLock()  # reentrant: a compile that is done already ends in submit's thread
_compiling: dict[tuple[int, Constraint], Future] = {}  # compiles in flight, shared by their requests


def compiler_for(engine: Engine) -> GrammarCompiler:
    """The engine's grammar compiler, made at first use (reading the vocabulary takes ~0.5 s: call it in a
    worker thread)."""
    with _compilers_lock:
        compiler = _compilers.get(engine)
        if compiler is None:
            compiler = GrammarCompiler(engine.tokenizer, engine.base.model.config.vocab_size, engine.eos_ids)
            _compilers[engine] = compiler
        return compiler


async def compiled(engine: Engine, structured: StructuredInput, seconds: float = COMPILE_SECONDS):
    """The compiled grammar of `structured` (bounds checked first): from the cache, or compiled on the
    grammar pool; InvalidRequest when invalid or not compiled within `seconds`. Requests for a constraint
    being compiled share that compile; one that ran out of time still finishes into the cache."""
    wanted = constraint(structured)
    where = structured.field
    compiler = _compilers.get(engine)
    grammar = compiler.cached(wanted) if compiler is not None else None
    if grammar is not None:
        return grammar
    key = (id(engine), wanted)
    with _compilers_lock:
        work = _compiling.get(key)
        if work is None:
            work = _compiling[key] = _pool.submit(lambda: compiler_for(engine).compile(wanted))
            work.add_done_callback(lambda done: _compile_ended(key, done))
    waited = asyncio.wrap_future(work)
    waited.add_done_callback(lambda done: done.cancelled() or done.exception())  # retrieved even after a timeout
    try:
        return await asyncio.wait_for(asyncio.shield(waited), seconds)
    except TimeoutError:
        raise InvalidRequest(f"{where}: the constraint takes too long to compile (over {seconds:g} s); simplify it",
                             where) from None
    except ValueError as exc:
        raise InvalidRequest(f"{where}: the {wanted.kind.replace('_', ' ')} is invalid: {str(exc)[:200]}",
                             where) from None


def _compile_ended(key: tuple[int, Constraint], done: Future) -> None:
    with _compilers_lock:
        if _compiling.get(key) is done:
            del _compiling[key]
