"""Token batches for training and evaluation: classification rows with their labels, generation rows with
the loss on the completion only, and a length-bucketed shuffle that keeps padding small."""

from __future__ import annotations

import torch

from .training_data import ClassificationData, GenerationData


def classification_batches(tokenizer, data: ClassificationData, order: list[int], size: int,
                           max_length: int | None, device):
    for start in range(0, len(order), size):
        rows = order[start:start + size]
        encoded = tokenizer([data.texts[i] for i in rows], truncation=max_length is not None, max_length=max_length,
                            padding=True, return_tensors="pt")
        yield {**{k: v.to(device) for k, v in encoded.items()},
               "labels": torch.tensor([data.labels[i] for i in rows], device=device)}


def render_prompt(tokenizer, prompt: str | list[dict]) -> str:
    """Chat turns through the base's chat template (ending with the assistant's turn opening)."""
    if isinstance(prompt, str):
        return prompt
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


def _completion_end(tokenizer, prompt) -> str:
    """What closes a completion: the chat template's end of turn, else the eos token."""
    if not isinstance(prompt, str):
        marker = "\x00"
        rendered = tokenizer.apply_chat_template([{"role": "assistant", "content": marker}], tokenize=False)
        return rendered.split(marker, 1)[1].rstrip("\n") or tokenizer.eos_token
    return tokenizer.eos_token


def generation_batches(tokenizer, data: GenerationData, order: list[int], size: int, max_length: int | None,
                        device):
    """Prompt + completion tokens; the loss sees the completion only (prompt labels are -100)."""
    for start in range(0, len(order), size):
        rows, labels = [], []
        for i in order[start:start + size]:
            prompt = data.prompts[i]
            prompt_ids = tokenizer(render_prompt(tokenizer, prompt), add_special_tokens=True)["input_ids"]
            completion_ids = tokenizer(data.completions[i] + _completion_end(tokenizer, prompt),
                                       add_special_tokens=False)["input_ids"]
            rows.append((prompt_ids + completion_ids)[:max_length])
            labels.append(([-100] * len(prompt_ids) + completion_ids)[:max_length])
        width = max(map(len, rows))
        pad = tokenizer.pad_token_id
        yield {"input_ids": torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=device),
               "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device),
               "labels": torch.tensor([r + [-100] * (width - len(r)) for r in labels], device=device)}


def bucketed_order(data, batch_size: int, seed: int) -> list[int]:
    """A seeded shuffle where each batch holds rows of similar length (sorted within windows of 8
    batches, then the batches shuffled): much less padding to compute on, same randomness in spirit."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(data), generator=generator).tolist()
    texts = data.texts if isinstance(data, ClassificationData) else data.completions
    window = batch_size * 8
    order = [i for start in range(0, len(order), window)
             for i in sorted(order[start:start + window], key=lambda i: len(texts[i]))]
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    return [i for b in torch.randperm(len(batches), generator=generator).tolist() for i in batches[b]]


def batches(config, tokenizer, data, order, device, truncate: bool = True):
    """Training truncates to max_length to bound its cost; evaluation sees whole rows, as a server does."""
    make = classification_batches if config.task == "classification" else generation_batches
    return make(tokenizer, data, order, config.batch_size, config.max_length if truncate else None, device)
