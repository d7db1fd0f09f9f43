"""Speculative decoding as a pure function over a target and its draft (MTP drafting for DeepSeek-V3).

One step, for a batch of rows that each have a pending token x (committed, not yet fed to the target) and
k draft distributions q_1..q_k over the next k tokens:

1. draw d_j ~ q_j (argmax for greedy rows);
2. the target scores [x, d_1..d_k] in ONE forward: p_0..p_k, where p_j is its distribution for the
   token after position j;
3. accept d_1, d_2, ... while u_j < p_{j-1}(d_j) / q_j(d_j) (u_j uniform); at the first rejection draw
   the replacement from norm(max(0, p_{j-1} - q_j)); if all k are accepted, draw a bonus token from p_k.
   Each row commits n = accepted + 1 tokens. This rule makes every committed token distributed exactly
   as the target alone would sample it (Leviathan et al. 2023; Chen et al. 2023). For greedy rows p and
   q are one-hot and the rule reduces to: accept while d_j equals the target's argmax, then take the
   target's argmax, so greedy output is identical to plain greedy decoding;
4. the draft is told how many tokens each row committed (it rolls its own and the target's cache back
   past them) and returns the next k draft distributions.

`target` and `draft` are plain callables, so the rule is tested with stub models whose drafts are always,
never or sometimes right; the engine passes closures over the model (main forward over the latent cache,
and the MTP module fed the main model's last hidden state).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from dsv3.inference.sampling import SamplingParams, draw, probs_from_logits, uniforms

# tokens [B, 1+k] (pending token, then the k drafts) -> target logits [B, 1+k, V]
TargetFn = Callable[[torch.Tensor], torch.Tensor]
# (committed tokens [B, 1+k], number committed per row [B]) -> next draft logits [B, k, V]
DraftFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Generators = Sequence[torch.Generator | None] | torch.Generator | None


@dataclass
class SpecStep:
    tokens: torch.Tensor  # [B, 1+k]: row b committed tokens[b, :num_committed[b]]
    num_committed: torch.Tensor  # [B] in 1..k+1
    num_accepted: torch.Tensor  # [B] drafts accepted, in 0..k
    draft_logits: torch.Tensor  # [B, k, V] the next step's drafts


@dataclass
class SpecStats:
    """Counts for one request or a whole run. acceptance = accepted / drafted."""

    drafted: int = 0
    accepted: int = 0
    forwards: int = 0  # target forwards (a prefill counts as one)
    tokens: int = 0  # tokens produced by those forwards
    per_position: list[int] = field(default_factory=list)  # accepted count at draft depth j

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_forward(self) -> float:
        return self.tokens / self.forwards if self.forwards else 0.0

    def add(self, other: SpecStats) -> None:
        self.drafted += other.drafted
        self.accepted += other.accepted
        self.forwards += other.forwards
        self.tokens += other.tokens
        for j, a in enumerate(other.per_position):
            if j < len(self.per_position):
                self.per_position[j] += a
            else:
                self.per_position.append(a)

    def as_dict(self) -> dict[str, float | int]:
        return {
            "drafted": self.drafted,
            "accepted": self.accepted,
            "acceptance": self.acceptance,
            "forwards": self.forwards,
            "tokens": self.tokens,
            "tokens_per_forward": self.tokens_per_forward,
        }


def _row_split(params: Sequence[SamplingParams]) -> tuple[list[int], list[int]]:
    greedy = [i for i, p in enumerate(params) if p.greedy]
    return greedy, [i for i, p in enumerate(params) if not p.greedy]


def _pick(gens: Generators, rows: list[int]) -> Generators:
    return gens if gens is None or isinstance(gens, torch.Generator) else [gens[i] for i in rows]


def draft_tokens(
    draft_logits: torch.Tensor, params: Sequence[SamplingParams], generators: Generators = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """draft logits [B, k, V] -> (draft tokens [B, k], draft distributions q [B, k, V] float32).

    q is None when every row is greedy (the acceptance rule then compares tokens only)."""
    B, k, V = draft_logits.shape
    _, sampled = _row_split(params)
    if not sampled:
        return draft_logits.argmax(dim=-1), None
    q = torch.stack([probs_from_logits(draft_logits[:, j], params) for j in range(k)], dim=1)
    d = q.argmax(dim=-1)  # exact for greedy rows (one-hot q)
    if sampled:
        idx = torch.tensor(sampled, device=d.device)
        gens = _pick(generators, sampled)
        for j in range(k):
            d[idx, j] = draw(q[idx, j], uniforms(gens, len(sampled))).to(d.device)
    return d, q


def accept(
    target_logits: torch.Tensor,
    drafts: torch.Tensor,
    q: torch.Tensor | None,
    params: Sequence[SamplingParams],
    generators: Generators = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The acceptance rule. target_logits [B, 1+k, V], drafts [B, k], q [B, k, V] (None if all rows are
    greedy) -> (tokens [B, 1+k], num_accepted [B]); row b commits tokens[b, :num_accepted[b] + 1]."""
    B, k1, V = target_logits.shape
    k = k1 - 1
    if drafts.shape != (B, k) or (q is not None and q.shape != (B, k, V)):
        raise ValueError(f"shape mismatch: target {tuple(target_logits.shape)}, drafts {tuple(drafts.shape)}")
    tokens = target_logits.float().argmax(dim=-1)  # greedy rows: the target's own choices
    match = (drafts == tokens[:, :k]).long()
    n_acc = match.cumprod(dim=1).sum(dim=1)  # length of the agreeing prefix
    greedy, sampled = _row_split(params)
    if not sampled:
        return tokens, n_acc
    if q is None:
        raise ValueError("sampled rows need the draft distributions q")
    idx = torch.tensor(sampled, device=tokens.device)
    gens = _pick(generators, sampled)
    sub_params = [params[i] for i in sampled]
    p = torch.stack([probs_from_logits(target_logits[idx, j], sub_params) for j in range(k1)], dim=1)
    d, qq = drafts[idx], q[idx].to(p.dtype)
    n = len(sampled)
    alive = torch.ones(n, dtype=torch.bool, device=p.device)  # still accepting
    n_s = torch.zeros(n, dtype=torch.long, device=p.device)
    out = torch.zeros(n, k1, dtype=torch.long, device=p.device)
    for j in range(k):
        u = uniforms(gens, n).to(p.device)
        pd = p[:, j].gather(1, d[:, j : j + 1]).squeeze(1).double()
        qd = qq[:, j].gather(1, d[:, j : j + 1]).squeeze(1).double()
        ok = alive & (u * qd < pd)
        out[ok, j] = d[ok, j]
        n_s += ok.long()
        rejected = alive & ~ok
        residual = (p[:, j] - qq[:, j]).clamp_min(0)
        degenerate = residual.sum(dim=-1) <= 0  # p == q up to rounding: fall back to p
        residual = torch.where(degenerate[:, None], p[:, j], residual)
        r = draw(residual, uniforms(gens, n))
        out[rejected, j] = r[rejected]
        alive = ok
    bonus = draw(p[:, k], uniforms(gens, n))
    out[alive, k] = bonus[alive]
    tokens[idx] = out
    n_acc[idx] = n_s
    return tokens, n_acc


def speculative_step(
    target: TargetFn,
    draft: DraftFn,
    pending: torch.Tensor,
    draft_logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Generators = None,
) -> SpecStep:
    """One draft-verify-commit step for B rows. pending [B] tokens, draft_logits [B, k, V]."""
    d, q = draft_tokens(draft_logits, params, generators)
    target_logits = target(torch.cat([pending.reshape(-1, 1).to(d.device), d], dim=1))
    tokens, n_acc = accept(target_logits, d, q, params, generators)
    n_commit = n_acc + 1
    return SpecStep(tokens, n_commit, n_acc, draft(tokens, n_commit))


def speculative_generate(
    target: TargetFn,
    draft: DraftFn,
    pending: torch.Tensor,
    draft_logits: torch.Tensor,
    params: Sequence[SamplingParams],
    max_new_tokens: int,
    generators: Generators = None,
) -> tuple[list[list[int]], SpecStats]:
    """Repeat `speculative_step` until every row has max_new_tokens tokens after `pending` (surplus is cut).

    Returns the new tokens per row and the statistics summed over rows (forwards = row verify forwards)."""
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    B, k, _ = draft_logits.shape
    out: list[list[int]] = [[] for _ in range(B)]
    stats = SpecStats(per_position=[0] * k)
    while min(len(o) for o in out) < max_new_tokens:
        step = speculative_step(target, draft, pending, draft_logits, params, generators)
        stats.forwards += B  # one verify forward per row
        stats.drafted += B * k
        stats.accepted += int(step.num_accepted.sum())
        for j in range(k):
            stats.per_position[j] += int((step.num_accepted > j).sum())
        rows = step.tokens.tolist()
        for b, n in enumerate(step.num_committed.tolist()):
            out[b].extend(rows[b][:n])
            stats.tokens += n
        pending = step.tokens.gather(1, (step.num_committed - 1)[:, None]).squeeze(1)
        draft_logits = step.draft_logits
    return [o[:max_new_tokens] for o in out], stats
