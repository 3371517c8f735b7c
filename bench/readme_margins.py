"""How safe the README's greedy examples are across CPU kinds: for each chat and generation the quick
start shows, the smallest lead of the best token over the next (in logits) over its greedy steps, in fp32
and in bf16, computed with transformers + PEFT (the engine's reference).

CPUs with and without native bf16 run different dtypes and kernels, which move logits by about 0.1 on
the embedded base; an example whose every lead is >= 0.5 prints the same text on each of them.

    python -m bench.readme_margins
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from loraplex_adapters.embedded_base import embedded_default_path
from loraplex_adapters.examples import EXAMPLES_DIR

README = Path(__file__).parents[1] / "README.md"
SAFE_LEAD = 0.5


def readme_examples() -> list[tuple[str, str | None, str, int]]:
    """(kind, adapter, text, max tokens) of each greedy example in the quick start."""
    text = README.read_text()
    quick = text[text.index("## Quick start"):text.index("\n## ", text.index("## Quick start") + 1)]
    out = []
    for line in re.findall(r"^\$ (loraplex (?:chat|generate) .*)$", quick, flags=re.M):
        argv = shlex.split(line)
        adapter = argv[argv.index("--adapter") + 1] if "--adapter" in argv else None
        tokens = int(argv[argv.index("--max-tokens") + 1]) if "--max-tokens" in argv else 64
        if argv[1] == "chat":
            out.append(("chat", adapter, argv[argv.index("-m") + 1], tokens))
        else:
            out.append(("generate", adapter, argv[2], tokens))
    for content in re.findall(r'c\.chat\(\[\{"role": "user", "content": "([^"]+)"\}\], adapter="(\w+)"\)', quick):
        out.append(("chat", content[1], content[0], 64))
    for prompt, tokens in re.findall(r'c\.generate_stream\("([^"]+)", max_tokens=(\d+)\)', quick):
        out.append(("generate", None, prompt, int(tokens)))
    return list(dict.fromkeys(out))


def greedy_leads(model, tokenizer, ids: list[int], max_tokens: int) -> tuple[str, list[float]]:
    ids, out, leads = list(ids), [], []
    stops = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")}
    for _ in range(max_tokens):
        with torch.inference_mode():
            top = model(input_ids=torch.tensor([ids])).logits[0, -1].float().topk(2)
        leads.append(float(top.values[0] - top.values[1]))
        token = int(top.indices[0])
        if token in stops:
            break
        ids.append(token)
        out.append(token)
    return tokenizer.decode(out), leads


def main() -> None:
    base = embedded_default_path()
    tokenizer = AutoTokenizer.from_pretrained(base)
    examples = readme_examples()
    for dtype in (torch.float32, torch.bfloat16):
        models = {None: AutoModelForCausalLM.from_pretrained(base, dtype=dtype).eval()}
        for adapter in {a for _, a, _, _ in examples if a}:
            fresh = AutoModelForCausalLM.from_pretrained(base, dtype=dtype).eval()
            models[adapter] = PeftModel.from_pretrained(fresh, EXAMPLES_DIR / adapter).eval()
        for kind, adapter, text, max_tokens in examples:
            ids = (tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=True,
                                                 add_generation_prompt=True, return_dict=True)["input_ids"]
                   if kind == "chat" else tokenizer(text)["input_ids"])
            output, leads = greedy_leads(models[adapter], tokenizer, ids, max_tokens)
            verdict = "safe" if min(leads) >= SAFE_LEAD else "FRAGILE"
            print(f"{str(dtype).split('.')[-1]:9} {kind:8} {text!r} -> {output!r}: smallest lead "
                  f"{min(leads):.2f} ({verdict})")


if __name__ == "__main__":
    main()
