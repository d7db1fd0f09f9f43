"""The GRPO objective and group-normalised advantages, as pure functions (TRL's GRPOTrainer semantics).

Per completion token t of sequence i, with r = exp(logprob - old_logprob) (the importance ratio against
the policy that sampled the rollout):

    loss_it = -min(r * A_i, clip(r, 1 - epsilon, 1 + epsilon_high) * A_i) + beta * kl_it
    kl_it   = exp(ref - logprob) - (ref - logprob) - 1          (k3: unbiased, always >= 0)

and the token losses are reduced over the mask by `loss_type`:
- "grpo":    mean over each sequence's tokens, then mean over sequences (short answers weigh more per token);
- "dapo":    sum over all tokens / number of active tokens (every token weighs the same);
- "dr_grpo": sum over all tokens / (B * max_completion_length) (a constant: no length bias at all).

Advantages (`group_advantages`): rewards of the G completions of one prompt minus their group mean,
divided by the group std (`scale_rewards="group"`), the batch std ("batch") or not at all ("none"), with
std + 1e-4 in the denominator and Bessel's correction, as TRL. A group whose rewards are all equal has
advantage exactly 0, so it contributes no gradient (only the KL term, when beta > 0, still pulls).
NaN rewards (no reward function applied to a completion) are left out of the group statistics and get
advantage 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LOSS_TYPES = ("grpo", "dapo", "dr_grpo")
SCALE_REWARDS = ("group", "batch", "none")


@dataclass
class LossStats:
    """Detached statistics of one `grpo_loss` call (masked means over completion tokens)."""

    clip_low: float  # ratio < 1 - epsilon where A < 0 (the clip is active)
    clip_high: float  # ratio > 1 + epsilon_high where A > 0
    clip_region: float  # either
    kl: float | None  # mean k3 KL to the reference (None when beta == 0)
    entropy: float | None  # mean per-token entropy, when given
    ratio_mean: float
    tokens: int

    def to_dict(self) -> dict[str, float | int | None]:
        return dict(vars(self))


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> float:
    return float((x * mask).sum() / mask.sum().clamp(min=1.0))


def grpo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    loss_type: str = "dapo",
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    beta: float = 0.0,
    max_completion_length: int | None = None,
    entropy: torch.Tensor | None = None,
) -> tuple[torch.Tensor, LossStats]:
    """The clipped GRPO loss (scalar, differentiable in `logprobs`) and its statistics.

    logprobs, old_logprobs, ref_logprobs, mask, entropy: [B, T]; advantages: [B]. ref_logprobs is None
    when beta == 0. epsilon_high None = epsilon. max_completion_length (dr_grpo) None = T."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if logprobs.dim() != 2 or old_logprobs.shape != logprobs.shape or mask.shape != logprobs.shape:
        raise ValueError(
            f"logprobs, old_logprobs and mask must be [B, T] of one shape, got {tuple(logprobs.shape)}, "
            f"{tuple(old_logprobs.shape)}, {tuple(mask.shape)}"
        )
    if advantages.shape != logprobs.shape[:1]:
        raise ValueError(f"advantages must be [B]={logprobs.shape[0]}, got {tuple(advantages.shape)}")
    if beta < 0 or epsilon < 0:
        raise ValueError(f"beta and epsilon must be >= 0, got beta={beta}, epsilon={epsilon}")
    if beta > 0 and (ref_logprobs is None or ref_logprobs.shape != logprobs.shape):
        raise ValueError("beta > 0 needs ref_logprobs of the same [B, T] shape as logprobs")
    eps_high = epsilon if epsilon_high is None else epsilon_high
    mask = mask.to(logprobs.dtype)
    adv = advantages.to(logprobs.dtype).unsqueeze(1)  # [B, 1]
    ratio = torch.exp(logprobs - old_logprobs)
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + eps_high)
    per_token = -torch.min(ratio * adv, clipped * adv)
    kl = None
    if beta > 0:
        assert ref_logprobs is not None
        d = ref_logprobs - logprobs
        kl = torch.exp(d) - d - 1
        per_token = per_token + beta * kl
    B, T = logprobs.shape
    if loss_type == "grpo":
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "dapo":
        loss = (per_token * mask).sum() / mask.sum().clamp(min=1.0)
    else:
        loss = (per_token * mask).sum() / (B * (max_completion_length or T))
    with torch.no_grad():
        low = ((ratio < 1 - epsilon) & (adv < 0)).to(mask.dtype)
        high = ((ratio > 1 + eps_high) & (adv > 0)).to(mask.dtype)
        stats = LossStats(
            clip_low=_masked_mean(low, mask),
            clip_high=_masked_mean(high, mask),
            clip_region=_masked_mean(torch.maximum(low, high), mask),
            kl=None if kl is None else _masked_mean(kl, mask),
            entropy=None if entropy is None else _masked_mean(entropy, mask),
            ratio_mean=_masked_mean(ratio, mask),
            tokens=int(mask.sum()),
        )
    return loss, stats


def _nanstd(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Standard deviation ignoring NaNs, with Bessel's correction (NaN for fewer than 2 values)."""
    keep = dim is not None
    mean = torch.nanmean(x, dim=dim, keepdim=True) if keep else torch.nanmean(x)
    count = (~torch.isnan(x)).sum(dim=dim) if keep else (~torch.isnan(x)).sum()
    var = torch.nanmean((x - mean) ** 2, dim=dim) if keep else torch.nanmean((x - mean) ** 2)
    var = torch.where(count > 1, var * count / (count - 1).clamp(min=1), torch.full_like(var, float("nan")))
    return var.sqrt()


def group_advantages(
    rewards: torch.Tensor, num_generations: int, scale_rewards: str = "group"
) -> tuple[torch.Tensor, torch.Tensor]:
    """rewards [N] (N = groups * num_generations, a group's completions adjacent; NaN = unscored) ->
    (advantages [N], is_std_zero [N] bool: the completion's group has no learning signal)."""
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS}, got {scale_rewards!r}")
    if rewards.dim() != 1 or num_generations < 1 or rewards.numel() % num_generations:
        raise ValueError(
            f"rewards must be [groups * num_generations], got {tuple(rewards.shape)} for G={num_generations}"
        )
    r = rewards.double()
    grouped = r.view(-1, num_generations)
    mean = torch.nanmean(grouped, dim=1).repeat_interleave(num_generations)
    if scale_rewards == "batch":
        std = _nanstd(r).expand_as(r) if r.numel() > 1 else torch.zeros_like(r)
    else:
        std = _nanstd(grouped, dim=1).repeat_interleave(num_generations)
        if num_generations == 1:
            std = torch.zeros_like(r)
    adv = r - mean
    if scale_rewards != "none":
        adv = adv / (std + 1e-4)
    is_std_zero = torch.isclose(std, torch.zeros_like(std))
    return torch.nan_to_num(adv, nan=0.0).to(rewards.dtype), is_std_zero


def token_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0, with_entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """logits [B, T, V], tokens [B, T] -> (log p(token) [B, T] fp32, entropy [B, T] or None) under the
    distribution softmax(logits / temperature) the rollout sampled from (temperature 0 counts as 1)."""
    x = logits.float()
    if temperature > 0 and temperature != 1.0:
        x = x / temperature
    logp = torch.log_softmax(x, dim=-1)
    lp = logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    ent = None
    if with_entropy:
        with torch.no_grad():
            ent = -(logp.exp() * logp).sum(-1)
    return lp, ent
