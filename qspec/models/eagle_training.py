"""Training an EAGLE-3 head on a target's own hidden states, on this machine's CPU.

One teacher-forced pass of the target (`collect`) keeps, per position, the concatenated aux
states (the head's input) and the target's final normed state (its next-token distribution
is that through the frozen LM head, recomputed on the fly over the draft vocabulary only: 49k
probabilities per position would not fit). The loss is the cross-entropy of the head against
that distribution, summed over `unroll` steps of training-time test: step 1 reads the
target's fused states, step k > 1 the head's own pre-norm outputs of step k - 1 one position
earlier, with the attention mask a drafting step sees (`ttt_mask`). The same unrolled pass,
without gradients, measures greedy per-position acceptance a_k on held-out text.

Two CPU minutes buy a few dozen Adam steps, so the head starts from a closed-form fit
(`init_head`: ridge regressions, held-out top-1 0.28 on SmolLM2-135M before any step) and
the gradient steps refine its layer (0.31 after 48 steps).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from qspec.engine.eagle_head import EagleHead, HeadConfig


@dataclass
class Features:
    """Per sequence: token ids (T,), aux states (T, n*H), final normed state (T, H), and the
    target's greedy next token (T,) over its full vocabulary."""

    ids: list[torch.Tensor]
    aux: list[torch.Tensor]
    final: list[torch.Tensor]
    greedy: list[torch.Tensor]

    def rows(self):
        return zip(self.ids, self.aux, self.final, self.greedy, strict=True)

    def tokens(self) -> int:
        return sum(t.numel() for t in self.ids)


def windows(feats: Features, size: int) -> Features:
    """Each sequence cut into training windows of at most `size` positions (their states were
    computed with the whole sequence before them, as in serving)."""
    out = Features([], [], [], [])
    for parts in feats.rows():
        for start in range(0, parts[0].numel(), size):
            for dest, part in zip((out.ids, out.aux, out.final, out.greedy), parts, strict=True):
                dest.append(part[start : start + size])
    return out


def lm_head_weight(target) -> torch.Tensor:
    return target.get_output_embeddings().weight


@torch.no_grad()
def collect(target, sequences: list[list[int]], aux_layers) -> Features:
    """One teacher-forced pass per sequence. Aux id i is the residual stream after i decoder
    layers (0: the embeddings), as vLLM's `_maybe_add_hidden_state` collects it."""
    body = target.get_decoder()
    grabbed: dict[int, torch.Tensor] = {}

    def keep(i):
        def hook(_module, _inputs, output):
            grabbed[i] = (output[0] if isinstance(output, tuple) else output).detach()

        return hook

    hooks = [
        (body.embed_tokens if i == 0 else body.layers[i - 1]).register_forward_hook(keep(i))
        for i in aux_layers
    ]
    feats = Features([], [], [], [])
    w = lm_head_weight(target)
    try:
        for seq in sequences:
            ids = torch.tensor(seq, dtype=torch.long, device=w.device)
            final = body(input_ids=ids[None]).last_hidden_state[0].float()
            feats.ids.append(ids)
            feats.aux.append(torch.cat([grabbed[i][0].float() for i in aux_layers], -1))
            feats.final.append(final)
            feats.greedy.append((final @ w.float().T).argmax(-1))
    finally:
        for h in hooks:
            h.remove()
    return feats


def choose_draft_vocab(feats: Features, size: int, vocab: int) -> torch.Tensor:
    """The `size` target ids the head may draft (sorted): the most frequent in the text and in
    the target's greedy predictions on it; ties (most ids never occur in a small corpus) go to
    the lower id, which BPE gives to its more frequent merges."""
    counts = torch.zeros(vocab, dtype=torch.float64)
    for ids, _, _, greedy in feats.rows():
        counts += torch.bincount(torch.cat([ids, greedy]).cpu(), minlength=vocab)[:vocab]
    score = counts - torch.arange(vocab, dtype=torch.float64) / vocab  # lower id breaks ties
    return score.topk(size).indices.sort().values


def rms(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


def ridge(pairs, lam: float) -> torch.Tensor:
    """B minimising mean |x B - y|^2 + lam |B|^2 over (x, y) batches (accumulated, float64)."""
    gram = rhs = None
    count = 0
    for x, y in pairs:
        x, y = x.double(), y.double()
        gram = x.T @ x if gram is None else gram + x.T @ x
        rhs = x.T @ y if rhs is None else rhs + x.T @ y
        count += len(x)
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    return torch.linalg.solve(gram / count + lam * eye, rhs / count)


def next_direction(final: torch.Tensor, target_norm: torch.Tensor) -> torch.Tensor:
    """What the head's output at p should be before its final norm (the target's norm weight):
    the direction of the target's final state at p + 1."""
    return final[1:] / target_norm


@torch.no_grad()
def init_head(
    target,
    cfg: HeadConfig,
    draft_ids: torch.Tensor,
    seed: int,
    feats: Features,
    lam: float = 0.1,
    focus: float = 4.0,
) -> EagleHead:
    """A head fitted in closed form, so that training starts from a useful draft.

    A 2-minute budget on 2 shared cores buys a few dozen gradient steps: far too few to train a
    layer from scratch. So the head starts as a linear guess of the target's next state:
    fc = ridge regression of that state's direction on the raw aux states (the residual path);
    the attention is made to attend to its own position (q = k = a seeded random projection of
    the token embedding, scaled by `focus`: self weight about 0.999 on SmolLM2), so that v and
    o_proj add a second ridge fit, of what fc missed on [norm(embedding) ; norm(fused)], cut to
    v's rank (kv_heads * head_dim). The MLP starts as a no-op (down_proj zero, gate/up small and
    random: copied target weights there made the first Adam steps blow the draft up). Final norm
    and LM head rows: the target's.
    Held-out top-1 of the first draft on SmolLM2-135M's corpus: 0.21 from fc alone, 0.28 with
    the attention fit, before any gradient step.
    """
    gen = torch.Generator().manual_seed(seed)
    body = target.get_decoder()
    w = lm_head_weight(target)
    head = EagleHead(cfg, body.embed_tokens.weight).to(w.device)
    mid, attn = head.midlayer, head.midlayer.self_attn
    tnorm = body.norm.weight.float()
    sd = torch.cat([aux for aux in feats.aux]).std(0) + 1e-6
    b = ridge(
        ((aux[:-1] / sd, next_direction(fin, tnorm)) for _, aux, fin, _ in feats.rows()),
        lam,
    )
    head.fc.weight.copy_((b / sd[:, None].double()).T)
    mid.input_layernorm.weight.fill_(1.0)
    mid.hidden_norm.weight.fill_(1.0)

    def inputs():
        for ids, aux, fin, _ in feats.rows():
            fused = head.fuse(aux[:-1])
            z = torch.cat([rms(F.embedding(ids[1:], head.embed).float()), rms(fused)], -1)
            yield z, next_direction(fin, tnorm) - fused

    u, s, vh = torch.linalg.svd(ridge(inputs(), lam), full_matrices=False)
    rank, hd, group = cfg.kv_heads * cfg.head_dim, cfg.head_dim, cfg.heads // cfg.kv_heads
    v = (u[:, :rank] * s[:rank].sqrt()).T.float()  # (kv_heads * hd, 2H)
    out = (s[:rank].sqrt()[:, None] * vh[:rank]).T.float()  # (H, kv_heads * hd)
    attn.v_proj.weight.copy_(v)
    for i in range(cfg.heads):  # query head i reads kv head i // group, as SDPA and vLLM do
        g = i // group
        attn.o_proj.weight[:, i * hd : (i + 1) * hd] = out[:, g * hd : (g + 1) * hd] / group
    proj = torch.randn(rank, 2 * cfg.hidden_size, generator=gen) / cfg.hidden_size**0.5
    proj[:, cfg.hidden_size :] = 0  # the embedding half: distinct tokens, distinct keys
    attn.k_proj.weight.copy_(focus * proj)
    attn.q_proj.weight.copy_(
        focus
        * proj.view(cfg.kv_heads, hd, -1).repeat_interleave(group, 0).reshape(cfg.heads * hd, -1)
    )
    for lin in (mid.mlp.gate_proj, mid.mlp.up_proj):  # small: Adam's first steps on the
        lin.weight.normal_(0.0, 0.02, generator=gen)  # zero down_proj then stay small too
    mid.mlp.down_proj.weight.zero_()
    head.norm.weight.copy_(tnorm)
    head.lm_head.weight.copy_(w[draft_ids].float())
    if head.d2t is not None:
        head.d2t.copy_(draft_ids - torch.arange(len(draft_ids), device=draft_ids.device))
    return head


def ttt_mask(n: int, step: int, device=None) -> torch.Tensor:
    """(n, step * n) boolean mask for the step-th draft at positions 0..n-1 over the keys of
    steps 1..step. A chain that starts at t drafts its step-th token at p = t + step - 1: it
    sees step 1's keys up to t (written from the target's states) and step m's key at
    t + m - 1 only, as when drafting; every row holds at least its own key."""
    p = torch.arange(n, device=device)[:, None]
    j = torch.arange(n, device=device)[None, :]
    blocks = [j <= p - step + 1] + [j == p - (step - m) for m in range(2, step + 1)]
    return torch.cat(blocks, dim=1)


def unroll(head: EagleHead, ids: torch.Tensor, aux: torch.Tensor, steps: int):
    """Draft-vocabulary logits (T-1, draft V) of steps 1..steps at positions 0..T-2: position p
    reads token p+1 and predicts token p+2."""
    n = ids.numel() - 1
    pos = torch.arange(n, device=ids.device)
    tokens, state = ids[1:], head.fuse(aux[:n])
    keys, values, logits = [], [], []
    for step in range(1, steps + 1):
        q, k, v, residual = head.qkv(tokens, state, pos)
        keys.append(k)
        values.append(v)
        mask = ttt_mask(n, step, ids.device)
        attn = head.attend(q, torch.cat(keys, 1), torch.cat(values, 1), mask)
        normed, prenorm = head.finish(attn, residual)
        logits.append(head.lm_head(normed))
        state = torch.cat([state[:1], prenorm[:-1]])  # step + 1 at p reads step's p - 1
    return logits


def teacher_probs(head: EagleHead, final: torch.Tensor) -> torch.Tensor:
    """The target's next-token distribution at positions 1..T-1, restricted to the draft
    vocabulary (the head's frozen LM head rows are the target's)."""
    return torch.softmax(head.lm_head(final[1:]).float(), -1)


def sequence_loss(head, ids, aux, final, steps: int) -> torch.Tensor:
    """Sum over steps of the mean cross-entropy against the target where the chain is real."""
    with torch.no_grad():
        teacher = teacher_probs(head, final)
    total = 0.0
    for step, logits in enumerate(unroll(head, ids, aux, steps), start=1):
        lp = F.log_softmax(logits[step - 1 :].float(), -1)
        total = total - (teacher[step - 1 :] * lp).sum(-1).mean()
    return total


@torch.no_grad()
def rollout_matches(head, ids, aux, greedy, steps: int):
    """Per chain start t (rows) and depth k (columns): (matched, on_text, valid).

    matched: the head's k-th greedy draft from t equals the target's greedy token there.
    on_text: the target's greedy token at depth k is the text's next token, so a chain whose
    drafts matched up to k continues along the text (always true on the target's own output),
    and the text-fed unroll is what drafting feeds. valid: the chain's depth k lies in the text.
    """
    n = ids.numel() - 1
    draft = head.draft_ids()
    shape = (n, steps)
    matched = torch.zeros(shape, dtype=torch.bool, device=ids.device)
    on_text = torch.zeros(shape, dtype=torch.bool, device=ids.device)
    valid = torch.zeros(shape, dtype=torch.bool, device=ids.device)
    for step, logits in enumerate(unroll(head, ids, aux, steps), start=1):
        p = torch.arange(step - 1, n, device=ids.device)  # positions of depth `step`
        t = p - step + 1
        matched[t, step - 1] = draft[logits[p].argmax(-1)] == greedy[p + 1]
        valid[t, step - 1] = True
        nxt = p + 2 < ids.numel()
        on_text[t[nxt], step - 1] = greedy[p[nxt] + 1] == ids[p[nxt] + 2]
    return matched, on_text, valid


def accepted_run(matched, on_text, valid) -> torch.Tensor:
    """Drafts a greedy verifier accepts from each chain start: the matched prefix (a match
    after depth k counts only while the chain stayed on the text)."""
    ok = matched & valid
    ok[:, 1:] &= on_text[:, :-1]
    return ok.long().cumprod(1).sum(1)


def per_position(matched, on_text, valid) -> dict:
    """a_k = P(depth k matched | depths 1..k-1 matched on the text), with counts."""
    out, reach = {}, valid[:, 0].clone()
    for k in range(matched.shape[1]):
        if k:
            reach = reach & matched[:, k - 1] & on_text[:, k - 1] & valid[:, k]
        tested = int(reach.sum())
        out[f"a_{k + 1}"] = int((reach & matched[:, k]).sum()) / tested if tested else None
        out[f"a_{k + 1}_n"] = tested
    return out


def evaluate(head, feats: Features, steps: int) -> dict:
    """Held-out loss and greedy per-position acceptance along the text."""
    rows, loss, count = [], 0.0, 0
    covered = torch.isin(torch.cat(feats.greedy), head.draft_ids()).float().mean()
    with torch.no_grad():
        for ids, aux, final, greedy in feats.rows():
            if ids.numel() < 3:
                continue
            loss += float(sequence_loss(head, ids, aux, final, steps)) * ids.numel()
            count += ids.numel()
            rows.append(rollout_matches(head, ids, aux, greedy, steps))
    stacked = [torch.cat(parts) for parts in zip(*rows, strict=True)]
    return {
        "heldout_loss": loss / max(count, 1),
        "draft_vocab_covers": float(covered),
        **per_position(*stacked),
    }


def train_head(
    target,
    train_sequences: list[list[int]] | Features,
    heldout_sequences: list[list[int]] | Features,
    *,
    seed: int = 0,
    max_seconds: float = 120.0,
    max_steps: int | None = None,
    draft_vocab_size: int = 8192,
    unroll: int = 3,
    lr: float = 5e-4,
    warmup: int = 5,
    window: int = 256,
    aux_layers=None,
) -> tuple[EagleHead, dict]:
    """A head for `target`, trained until max_seconds or max_steps, whichever comes first.

    Sequences may come as Features already collected with these aux layers (the run's own
    teacher-forced pass). Deterministic under the seed for a fixed step count and thread
    count (the window order, the random init and every op are); a time limit makes the step
    count itself depend on the machine, which the report records.
    """
    start = time.perf_counter()
    vocab = target.config.get_text_config(decoder=True).vocab_size
    draft_vocab_size = min(draft_vocab_size, vocab)
    cfg = HeadConfig.from_target(target.config, draft_vocab_size, aux_layers)
    train, held = (
        s if isinstance(s, Features) else collect(target, s, cfg.aux_layers)
        for s in (train_sequences, heldout_sequences)
    )
    collect_s = time.perf_counter() - start
    draft_ids = (
        torch.arange(vocab)
        if draft_vocab_size == vocab
        else choose_draft_vocab(train, draft_vocab_size, vocab)
    ).to(train.ids[0].device)
    head = init_head(target, cfg, draft_ids, seed, train)
    init_s = time.perf_counter() - start - collect_s
    # frozen: the LM head (the target's rows) and fc, the closed-form fit over all the training
    # text; fc reads unnormalised aux states, where Adam's per-weight steps of lr wreck it
    head.lm_head.weight.requires_grad_(False)
    head.fc.weight.requires_grad_(False)
    before = evaluate(head, held, unroll)
    params = [p for p in head.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    order_gen = torch.Generator().manual_seed(seed)
    parts = windows(train, window)
    usable = [i for i, ids in enumerate(parts.ids) if ids.numel() >= 3]
    steps, seen, losses, order = 0, 0, [], []
    began = time.perf_counter()
    while (max_steps is None or steps < max_steps) and time.perf_counter() - began < max_seconds:
        if not order:
            order = [usable[i] for i in torch.randperm(len(usable), generator=order_gen)]
        i = order.pop(0)
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (steps + 1) / warmup)
        loss = sequence_loss(head, parts.ids[i], parts.aux[i], parts.final[i], unroll)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        steps += 1
        seen += parts.ids[i].numel()
    train_s = time.perf_counter() - began
    head.requires_grad_(False)
    after = evaluate(head, held, unroll)
    report = {
        "train_tokens": train.tokens(),
        "heldout_tokens": held.tokens(),
        "steps": steps,
        "epochs": steps / max(len(usable), 1),
        "tokens_seen": seen,
        "collect_seconds": collect_s,
        "init_seconds": init_s,
        "train_seconds": train_s,
        "final_loss": sum(losses[-10:]) / max(len(losses[-10:]), 1) if losses else None,
        "losses": losses,
        "seed": seed,
        "threads": torch.get_num_threads(),
        "draft_vocab_size": draft_vocab_size,
        "unroll": unroll,
        "lr": lr,
        "window": window,
        "aux_layers": list(cfg.aux_layers),
        "before": before,
        **after,
    }
    return head, report
