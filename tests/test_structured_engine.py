"""Constrained rows in the engine's step loop: a mixed step holds rows of different adapters and different
constraints (JSON schemas, any JSON object, a regex, a choice) beside free rows; every constrained output
matches its own constraint, and the free rows' greedy outputs are those of their runs alone."""

from __future__ import annotations

import asyncio
import json
import re

import jsonschema
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_step_loop import PROMPTS, alone, engine, run

from loraplex_server.api.errors import InvalidRequest
from loraplex_server.api.structured import StructuredInput, compiled
from loraplex_server.engine.engine import GenerationRequest
from loraplex_server.engine.grammar import Constraint, GrammarCompiler, RowGrammar, choice_grammar, mask_logits
from loraplex_server.engine.sampling import SamplingParams

SCHEMAS = [
    {"type": "object", "properties": {"ok": {"type": "boolean"}, "name": {"type": "string", "maxLength": 4}},
     "required": ["ok", "name"], "additionalProperties": False},
    {"type": "object", "properties": {"level": {"enum": ["low", "mid", "high"]},
                                      "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3}},
     "required": ["level", "tags"], "additionalProperties": False},
    {"type": "array", "items": {"type": "string", "maxLength": 2}, "minItems": 1, "maxItems": 2},
]
REGEX = r"[a-c]{2,4}-(yes|no)"
CHOICES = ["red", "green", "blue \"sky\"\n"]


@pytest.fixture(scope="module")
def eng(tiny):
    return engine(tiny)


@pytest.fixture(scope="module")
def compiler(eng):
    return GrammarCompiler(eng.tokenizer, eng.base.model.config.vocab_size, eng.eos_ids)


def _text(eng, ids: list[int]) -> str:
    return eng.tokenizer.decode([i for i in ids if i not in eng.eos_ids], skip_special_tokens=True)


def test_mixed_step_of_adapters_and_constraints_matches_each_constraint(eng, compiler):
    constraints = [Constraint("json_schema", json.dumps(s)) for s in SCHEMAS] + [
        Constraint("json_object"), Constraint("regex", REGEX), Constraint("choice", json.dumps(CHOICES))]
    names = ["gen_qv_r4", "gen_all_r8", None, "gen_mlp_r2"]
    greedy, sampled = SamplingParams(max_new_tokens=48), SamplingParams(max_new_tokens=48, temperature=1.0, seed=7)
    constrained = [GenerationRequest(PROMPTS[i % len(PROMPTS)], names[i % 4], sampled if i % 2 else greedy,
                                     grammar=compiler.compile(c)) for i, c in enumerate(constraints)]
    free = [GenerationRequest(PROMPTS[i], names[(i + 1) % 4], SamplingParams(max_new_tokens=12)) for i in range(4)]
    together = run(eng, constrained + free)
    for request, constraint in zip(constrained, constraints, strict=True):
        ids = together[request.request_id]
        assert ids[-1] in eng.eos_ids, f"{constraint.kind} did not end"  # the grammar finished: only EOS was left
        text = _text(eng, ids)
        if constraint.kind == "json_schema":
            jsonschema.validate(json.loads(text), json.loads(constraint.text))
        elif constraint.kind == "json_object":
            assert isinstance(json.loads(text), dict)
        elif constraint.kind == "regex":
            assert re.fullmatch(REGEX, text), text
        else:
            assert text in CHOICES
    for request in free:
        assert together[request.request_id] == alone(eng, request)
    assert not eng._grammars  # every matcher left with its row


def test_masks_touch_only_constrained_rows(compiler):
    logits = torch.randn(3, compiler.info.vocab_size)
    before = logits.clone()
    grammar = compiler.compile(Constraint("choice", json.dumps(["red", "green"])))
    masked = mask_logits(logits, [None, RowGrammar(grammar), None])
    assert torch.equal(masked[0], before[0]) and torch.equal(masked[2], before[2])
    allowed = torch.isfinite(masked[1]).nonzero().flatten().tolist()
    assert 0 < len(allowed) < 20


def test_compile_is_cached_and_invalid_constraints_raise_value_error(compiler):
    schema = Constraint("json_schema", json.dumps(SCHEMAS[0]))
    assert compiler.compile(schema) is compiler.compile(schema)
    with pytest.raises(ValueError):
        compiler.compile(Constraint("json_schema", '{"type": 12}'))
    with pytest.raises(ValueError):
        compiler.compile(Constraint("regex", "(unclosed"))


def test_choice_grammar_escapes_quotes_and_newlines():
    assert choice_grammar(['a"b', "c\nd"]) == 'root ::= "a\\"b" | "c\\nd"'


def test_a_compile_past_its_time_limit_is_refused_and_lands_in_the_cache_later(eng):
    slow = StructuredInput("regex", "[a-z]{1,128}-[0-9]{1,128}", "guided_regex")
    with pytest.raises(InvalidRequest, match="too long to compile"):
        asyncio.run(compiled(eng, slow, seconds=0.001))
    assert asyncio.run(compiled(eng, slow, seconds=60)) is asyncio.run(compiled(eng, slow, seconds=0.001))


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(kind=st.sampled_from(["json_schema", "regex", "choice", "json_object", "grammar"]),
       value=st.one_of(st.text(max_size=40), st.recursive(
           st.none() | st.booleans() | st.integers() | st.text(max_size=8),
           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
           max_leaves=12)))
def test_any_constraint_compiles_or_is_refused_as_invalid(eng, kind, value):
    """The whole class of client constraints: each either compiles or is an InvalidRequest (400 /
    INVALID_ARGUMENT), never another failure."""
    try:
        asyncio.run(compiled(eng, StructuredInput(kind, value, "guided"), seconds=30))
    except InvalidRequest:
        pass


def test_the_engine_refuses_choices_that_would_share_one_grammar(eng, compiler):
    """A row's matcher is keyed by its request: n > 1 choices under one would advance it for each other."""
    request = GenerationRequest(PROMPTS[0], None, SamplingParams(max_new_tokens=4, n=2),
                                grammar=compiler.compile(Constraint("json_object")))
    with pytest.raises(ValueError, match="n > 1"):
        eng.submit(request)
    assert not eng.has_work
