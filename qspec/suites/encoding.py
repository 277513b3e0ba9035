"""Suite prompts as token ids, and the token ids that end a generation.

Shared by the generation stage, the lm-eval lossless check and the benchmark, so all three
encode the same prompts and stop at the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class EncodedPrompt:
    id: str
    category: str
    ids: torch.Tensor
    max_new_tokens: int


def spread(prompts: list, n: int) -> list:
    """The first n prompts taken round-robin across categories, so small runs cover each one."""
    by_category: dict[str, list] = {}
    for p in prompts:
        by_category.setdefault(p.category, []).append(p)
    queues = list(by_category.values())
    picked = []
    while len(picked) < min(n, len(prompts)):
        for q in queues:
            if q and len(picked) < n:
                picked.append(q.pop(0))
    return picked


def prompt_ids(tokenizer, prompt) -> list[int]:
    """Token ids of one suite prompt; chat prompts go through the chat template when there is one."""
    if prompt.messages is not None and tokenizer.chat_template:
        ids = tokenizer.apply_chat_template(
            prompt.messages, add_generation_prompt=True, tokenize=True
        )
        return ids if isinstance(ids, list) else ids["input_ids"]
    if prompt.prompt is not None:
        return tokenizer(prompt.prompt)["input_ids"]
    return tokenizer("\n\n".join(m["content"] for m in prompt.messages))["input_ids"]


def encode_prompts(
    tokenizer, prompts: list, max_prompts: int, max_new_tokens: int, device
) -> list[EncodedPrompt]:
    """The run's share of a suite's prompts (spread across categories), each with its token cap."""
    out = []
    for p in spread(prompts, max_prompts):
        limit = min(p.max_new_tokens or max_new_tokens, max_new_tokens)
        ids = torch.tensor(prompt_ids(tokenizer, p), device=device)
        out.append(EncodedPrompt(p.id, p.category, ids, limit))
    return out


def stop_ids(tokenizer, model=None) -> frozenset[int]:
    """The tokenizer's eos plus the model's generation-config eos ids (chat models list several)."""
    ids = {tokenizer.eos_token_id}
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(eos if isinstance(eos, list | tuple) else [eos])
    return frozenset(i for i in ids if isinstance(i, int))
