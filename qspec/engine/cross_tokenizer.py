"""A draft model whose tokenizer differs from the target's.

The loop speaks the target's token ids; this drafter keeps the draft's own ids for the same
text and translates both ways, so the engine, the acceptance rules and the records stay as
they are (acceptance is counted in target tokens).

- Greedy: the draft decodes greedily in its own vocabulary, its new text is re-tokenized with
  the target's tokenizer and those target tokens are the proposal (string-level, as
  transformers' universal assisted generation does). Any proposal is verified against the
  target's argmax, so output equals the target's own.
- Sampling: token-level intersection (Timor et al., ICML 2025, arXiv 2502.05202): the draft's
  distribution is restricted to the tokens whose byte strings both vocabularies hold and
  renormalised; a draw is one target token with the same bytes, and q is a proper distribution
  over the target's vocabulary, so rejection sampling stays exact. Several draft tokens can
  spell the same bytes (SentencePiece byte fallback: `<0x41>` beside `A`), so q of a target
  token is the SUM of their probabilities.

Before each step the draft's context is the target's text re-tokenized with the draft's
tokenizer; the draft's cache keeps the longest prefix it shares with what it already holds.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field

import torch

from qspec.engine.drafters import FirstDrafts, one_hot_drafts
from qspec.engine.kv import KV, DynamicKV, StaticKV, new_kv
from qspec.engine.sampling import Sampler


def _gpt2_byte_decoder() -> dict[str, int]:
    """The inverse of GPT-2's bytes_to_unicode: printable stand-ins back to raw bytes."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars, extra = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(keep, chars, strict=True)}


def _decoder_types(spec) -> list[dict]:
    """Every decoder in a tokenizer.json decoder spec, a Sequence's members included."""
    if not isinstance(spec, dict):
        return []
    return [spec, *(d for member in spec.get("decoders") or [] for d in _decoder_types(member))]


def _decoder_kind(tokenizer) -> str:
    """How a token's text maps to bytes: GPT-2 byte-level, SentencePiece-style (U+2581 for a
    space, <0xNN> byte fallback), or plain text, read from the decoder's types."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()).get("decoder") if backend else None
    decoders = _decoder_types(spec)
    types = {d.get("type") for d in decoders}
    if "ByteLevel" in types:
        return "bytelevel"
    replaces_space = any(
        d.get("type") == "Replace" and (d.get("pattern") or {}).get("String") == "\u2581"
        for d in decoders
    )
    if "Metaspace" in types or "ByteFallback" in types or replaces_space:
        return "metaspace"
    return "plain"


@functools.cache  # a run asks for the same tokenizer's map once per suite and once per pairing
def token_bytes(tokenizer) -> dict[int, bytes]:
    """The bytes each ordinary token stands for (special and added tokens left out)."""
    kind = _decoder_kind(tokenizer)
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}))
    byte_of = _gpt2_byte_decoder() if kind == "bytelevel" else {}
    out = {}
    for piece, i in tokenizer.get_vocab().items():
        if i in special:
            continue
        if kind == "bytelevel":
            if all(ch in byte_of for ch in piece):
                out[i] = bytes(byte_of[ch] for ch in piece)
        elif (
            kind == "metaspace" and len(piece) == 6 and piece.startswith("<0x") and piece[-1] == ">"
        ):
            out[i] = bytes([int(piece[3:5], 16)])
        elif kind == "metaspace":
            out[i] = piece.replace("\u2581", " ").encode()
        else:
            out[i] = tokenizer.convert_tokens_to_string([piece]).encode()
    return out


@dataclass(frozen=True)
class VocabMap:
    """The tokens both vocabularies share, matched by their bytes."""

    draft_ids: torch.Tensor  # (S,) draft ids of the shared tokens
    target_ids: torch.Tensor  # (S,) the target ids with the same bytes, in the same order
    target_vocab: int  # rows of the target's logits
    draft_only: int  # ordinary draft tokens the target's vocabulary lacks
    target_only: int

    @property
    def shared(self) -> int:
        return self.draft_ids.numel()

    def summary(self) -> dict:
        return {
            "shared": self.shared,
            "draft_only": self.draft_only,
            "target_only": self.target_only,
        }


def vocab_map(target_tok, draft_tok, target_vocab: int, draft_vocab: int) -> VocabMap:
    """Match tokens by bytes; ids past either model's logits are left out."""
    t_bytes = {b: i for i, b in token_bytes(target_tok).items() if i < target_vocab}
    d_bytes = {i: b for i, b in token_bytes(draft_tok).items() if i < draft_vocab}
    pairs = sorted((d, t_bytes[b]) for d, b in d_bytes.items() if b in t_bytes)
    if not pairs:
        raise ValueError("the two tokenizers share no token: no draft can be mapped")
    d_ids, t_ids = zip(*pairs, strict=True)
    return VocabMap(
        torch.tensor(d_ids),
        torch.tensor(t_ids),
        target_vocab,
        draft_only=len(d_bytes) - len(pairs),
        target_only=len(t_bytes) - len(pairs),
    )


def logits_rows(model) -> int:
    return model.get_output_embeddings().weight.shape[0]


@dataclass
class CrossTokenizerDrafter:
    """A draft model with its own tokenizer, proposing in the target's token ids."""

    model: torch.nn.Module
    target_tok: object
    draft_tok: object
    vocab: VocabMap
    name: str = "cross"
    kv: KV | None = None
    model_tokens: int = 0  # draft-model tokens decoded, for draft tokens per target token
    ctx: list[int] = field(default_factory=list)  # the draft ids the cache holds
    target_layers: tuple[int, ...] = ()
    budget_room: int = 17  # draft tokens a proposal may add after a sync (gamma <= 16)

    def prefill(self, tokens: torch.Tensor, capacity: int, target_states=None) -> None:
        self.ctx, self.model_tokens = [], 0
        self.device = tokens.device
        # the draft's tokenizer may need more tokens for the same text: size its cache by the
        # prompt's ratio, with room to spare (_sync moves to a dynamic cache if it runs out)
        prompt = self.draft_tok(self.target_tok.decode(tokens.tolist(), skip_special_tokens=True))
        ratio = max(1.0, len(prompt["input_ids"]) / max(1, tokens.numel()))
        self.kv = new_kv(self.model, int(2 * ratio * capacity) + 16, None, slot="draft")
        self.vocab_dev = (
            self.vocab.draft_ids.to(self.device),
            self.vocab.target_ids.to(self.device),
        )
        self._sync(tokens.tolist())

    def _sync(self, history: list[int]) -> torch.Tensor:
        """Bring the draft's cache to the target's text; returns its next-token logits."""
        text = self.target_tok.decode(history, skip_special_tokens=True)
        want = self.draft_tok(text)["input_ids"] or [self.draft_tok.eos_token_id or 0]
        common = 0
        for a, b in zip(self.ctx, want, strict=False):
            if a != b:
                break
            common += 1
        keep = min(common, len(want) - 1)  # feed at least one token: its logits are needed
        if isinstance(self.kv, StaticKV) and len(want) + self.budget_room > self.kv.capacity:
            self.kv, keep = DynamicKV(self.model), 0
        self.kv.rollback(keep)
        feed = torch.tensor(want[keep:], device=self.device)
        logits = self.kv.forward(feed, last_only=feed.numel() > 1)[-1]
        self.ctx = list(want)
        return logits

    def _step(self, draft_id: int) -> torch.Tensor:
        self.ctx.append(draft_id)
        return self.kv.forward(torch.tensor([draft_id], device=self.device))[-1]

    def propose(self, tokens, budget, sampler: Sampler, generator, history, stop_below=None):
        logits = self._sync(history)
        if sampler.greedy:
            return self._propose_text(logits, budget, history), None
        return self._propose_shared(logits, budget, sampler, generator, stop_below)

    def _propose_text(self, logits, budget: int, history: list[int]) -> torch.Tensor:
        """Greedy: decode `budget` draft tokens (budget - 1 forwards after the sync's: the last
        token's logits are never needed), then re-tokenize their text for the target."""
        start = len(self.ctx)
        decoded = []
        for i in range(budget):
            decoded.append(int(logits.argmax(-1)))
            if i + 1 < budget:
                logits = self._step(decoded[-1])
        self.model_tokens += len(decoded)
        before = self.draft_tok.decode(self.ctx[:start], skip_special_tokens=True)
        after = self.draft_tok.decode(self.ctx[:start] + decoded, skip_special_tokens=True)
        new = after[len(before) :] if after.startswith(before) else ""
        new = new.rstrip("\ufffd")  # a character cut mid-way: its bytes are not there yet
        ids = self.target_tok(new, add_special_tokens=False)["input_ids"][:budget] if new else []
        return torch.tensor(ids, dtype=torch.long, device=self.device)

    def _propose_shared(self, logits, budget, sampler: Sampler, generator, stop_below):
        """Sampling: draw from the draft's distribution over the shared tokens only."""
        d_ids, t_ids = self.vocab_dev
        out = torch.empty(budget, dtype=torch.long, device=self.device)
        probs = torch.zeros(budget, self.vocab.target_vocab, device=self.device)
        n = 0
        for i in range(budget):
            shared = sampler.probs(logits)[d_ids]
            mass = float(shared.sum())
            if mass <= 0.0:
                break
            shared = shared / mass
            j = torch.multinomial(shared, 1, generator=generator)
            out[i] = t_ids[j]
            probs[i].index_add_(0, t_ids, shared)  # draft tokens of the same bytes add up
            self.model_tokens += 1
            n = i + 1
            if stop_below is not None and float(probs[i, out[i]]) < stop_below:
                n = i
                break
            if i + 1 < budget:
                logits = self._step(int(d_ids[j]))
        return out[:n], probs[:n]

    def shared_probs(self, history: list[int], sampler: Sampler) -> torch.Tensor:
        """q as token-level intersection uses it after `history`: the draft's distribution on
        the shared tokens, renormalised, laid out over the target's vocabulary."""
        d_ids, t_ids = self.vocab_dev
        shared = sampler.probs(self._sync(history))[d_ids]
        q = torch.zeros(self.vocab.target_vocab, device=self.device)
        mass = shared.sum()
        if mass > 0:
            q.index_add_(0, t_ids, shared / mass)  # draft tokens of the same bytes add up
        return q

    def rollback(self, n_tokens: int, target_states=None) -> None:
        pass  # the next propose re-tokenizes the target's text and keeps the common prefix

    @torch.inference_mode()
    def first_draft_q(self, ids, start, sampler: Sampler, vocab: int) -> FirstDrafts:
        """At each position the draft reads the target's text re-tokenized, as in the engine.
        Greedy: the first target token of its string-level proposal (one-hot); sampled: its
        distribution restricted to the shared tokens (token-level intersection)."""
        host = ids.tolist()
        self.prefill(ids[:start], 2 * ids.numel())
        if sampler.greedy:
            first = []
            for pos in range(start, ids.numel()):
                proposal, _ = self.propose(ids[:pos], 1, sampler, None, host[:pos])
                first.append(int(proposal[0]) if proposal.numel() else None)
            return one_hot_drafts(first, vocab, ids.device)
        rows = [self.shared_probs(host[:pos], sampler) for pos in range(start, ids.numel())]
        q = torch.stack(rows).to(ids.device) if rows else torch.zeros(0, vocab)
        return FirstDrafts(q, torch.ones(q.shape[0], dtype=torch.bool, device=q.device))
