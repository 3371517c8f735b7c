"""Constrained decoding: grammars compiled from a JSON schema, any JSON object, a regex or a choice among
strings; one matcher per constrained row; each step's token masks applied to the batch's logits.

The grammar engine is xgrammar (vLLM's default backend). Measured on this project's CPU with the
embedded base's tokenizer (SmolLM2, 49,152 tokens; `python -m bench.api_structured`): the per-token mask
of a JSON schema costs xgrammar a median ~5 us against ~28 us for llguidance 1.9, and a 50-property
schema compiles in ~50 ms. xgrammar releases the GIL while it compiles (a long compile in a thread does
not hold up the event loop or the step thread; checked), and its one weakness, compile time that grows
with regex repetition bounds (`[a-z]{1,100000}` takes ~1 s), is bounded before compiling
(api/structured.py) and by a time limit.

As in vLLM: compiling happens off the step thread (the request path compiles before it submits, and
caches), the engine only advances matchers and fills masks. Only constrained rows cost anything: a
step without them does no grammar work at all, and in a mixed step the bitmask is filled for the
constrained rows alone and applied to their rows of the logits (`indices`).
"""

from __future__ import annotations

import functools
import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    import xgrammar as xgr

KINDS = ("json_schema", "json_object", "regex", "choice")
# xgrammar 0.2.9 writes the characters of a length-bounded JSON string (maxLength) as this class, which lets
# control characters through (JSON forbids them unescaped, and json.loads refuses them); its other strings
# use the strict class.
_LAX_STRING_CHAR = r"[^\"\\\r\n]"
_STRICT_STRING_CHAR = r"[^\0-\x1f\"\\]"


@dataclass(frozen=True)
class Constraint:
    """What a row's output must match: `kind` (one of KINDS) and its text (a schema, a regex, or the
    choices as a JSON list); the cache key of its compiled grammar."""

    kind: str
    text: str = ""


def choice_grammar(choices: list[str]) -> str:
    """An EBNF grammar whose sentences are exactly `choices` (JSON string escapes are EBNF's too)."""
    return "root ::= " + " | ".join(json.dumps(choice, ensure_ascii=False) for choice in choices)


class GrammarCompiler:
    """Compiles constraints for one tokenizer and logits width, with a bounded LRU of compiled grammars.
    Thread-safe; blocking (call it from a worker thread, never the event loop or the step thread)."""

    def __init__(self, tokenizer, vocab_size: int, stop_ids: set[int], cache_size: int = 256) -> None:
        self.info = _xgrammar().TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                       stop_token_ids=sorted(stop_ids) or None)
        # One thread per compile: several requests compile at once on the caller's pool instead.
        self._compiler = _xgrammar().GrammarCompiler(self.info, max_threads=1, cache_enabled=False)
        self._cache: OrderedDict[Constraint, xgr.CompiledGrammar] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def cached(self, constraint: Constraint) -> xgr.CompiledGrammar | None:
        with self._lock:
            grammar = self._cache.get(constraint)
            if grammar is not None:
                self._cache.move_to_end(constraint)
            return grammar

    def compile(self, constraint: Constraint) -> xgr.CompiledGrammar:
        """The compiled grammar (from the cache when there); ValueError when the constraint is invalid."""
        grammar = self.cached(constraint)
        if grammar is not None:
            return grammar
        try:
            grammar = self._compile(constraint)
        except (RuntimeError, ValueError, TypeError) as exc:  # xgrammar's own errors are RuntimeErrors
            raise ValueError(_first_line(exc)) from None
        with self._lock:
            self._cache[constraint] = grammar
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return grammar

    def _compile(self, constraint: Constraint) -> xgr.CompiledGrammar:
        if constraint.kind == "json_schema":
            ebnf = str(_xgrammar().Grammar.from_json_schema(constraint.text, any_whitespace=False, strict_mode=True))
            return self._compiler.compile_grammar(ebnf.replace(_LAX_STRING_CHAR, _STRICT_STRING_CHAR))
        if constraint.kind == "json_object":
            return self._compiler.compile_json_schema('{"type": "object"}', any_whitespace=False)
        if constraint.kind == "regex":
            return self._compiler.compile_regex(constraint.text)
        if constraint.kind == "choice":
            return self._compiler.compile_grammar(choice_grammar(json.loads(constraint.text)))
        raise ValueError(f"unknown constraint kind {constraint.kind!r}")


def _first_line(exc: BaseException) -> str:
    """xgrammar's message without its C++ source location prefix."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text.split(": ", 1)[1] if text.startswith("[") and ": " in text else text


class RowGrammar:
    """One row's matcher: it fills the row's allowed tokens and advances with each token the row takes."""

    def __init__(self, grammar: xgr.CompiledGrammar, restart: bool = False) -> None:
        self._matcher = _xgrammar().GrammarMatcher(grammar)
        self._restart = restart  # ignore_eos rows (benchmarks) start a new document when one ends

    def fill(self, bitmask: torch.Tensor, index: int) -> None:
        if self._matcher.is_terminated() and self._restart:
            self._matcher.reset()
        self._matcher.fill_next_token_bitmask(bitmask, index)

    def accept(self, token_id: int) -> bool:
        """Advance by the row's token; False if the grammar refuses it (the mask should have prevented it)."""
        return self._matcher.accept_token(token_id)


def mask_logits(logits: torch.Tensor, rows: list[RowGrammar | None]) -> torch.Tensor:
    """`logits` [B, V] as float32 with each constrained row's disallowed tokens at -inf (in place when the
    logits are float32 already); rows without a grammar (None) are left untouched."""
    constrained = [i for i, row in enumerate(rows) if row is not None]
    logits = logits.float()
    if not constrained:
        return logits
    bitmask = _xgrammar().allocate_token_bitmask(logits.shape[0], logits.shape[1])
    for i in constrained:
        rows[i].fill(bitmask, i)
    _xgrammar().apply_token_bitmask_inplace(logits, bitmask.to(logits.device), vocab_size=logits.shape[1],
                                    indices=constrained)
    return logits


@functools.cache
def _xgrammar():
    """xgrammar takes about a second to import: only a server that gets a constraint pays it."""
    import xgrammar

    return xgrammar
