"""The reward model: a dsv3 Transformer with a scalar head on the last token, trained on preference pairs.

    r(x, y) = w . h_last(x, y)          h_last: the backbone's final normalised hidden state at the last
                                        (non-padding) token of prompt + response, w: Linear(hidden, 1)

Training (`dsv3 rm`, dsv3.rl.rm_cli) minimises the Bradley-Terry loss over pairs (chosen y+, rejected y-):

    loss = -log sigmoid(r(x, y+) - r(x, y-))  [+ c * (r(x, y+) + r(x, y-))^2]

which is the negative log-likelihood of "y+ is preferred" when P(y+ > y-) = sigmoid(r+ - r-). Only the
difference of rewards is constrained, so the head has no bias (a bias cancels) and rewards can drift; the
optional second term (TRL RewardTrainer's `center_rewards_coefficient`, 0.01 in its docs) pulls their
mean toward 0, so that they are on a stable scale when mixed with rule-based rewards in GRPO.

What the model reads (`encode_response`), one format for training and for scoring: the prompt (a string is
one user message, or a list of messages) rendered by the tokenizer's chat template with the generation
prompt, exactly as the policy's prompt is encoded (dsv3.tasks.prompts), then the response as the policy wrote
it, then EOS. A response opening with what the generation prompt already supplied (`<think>\\n` under
DeepSeek-V3's template; GRPO puts it back in front of completions) is not repeated. The score is read at
the EOS, which attends to the whole conversation. A sequence longer than `max_length` keeps its last tokens
(the response and the EOS). Batches are right-padded: under causal attention padding after a token never
changes that token's hidden state, so a padded sequence scores as it does alone.

On disk (a run directory of `dsv3 rm`): `model/` the backbone as an HF directory with its tokenizer
(`save_pretrained`), `reward_head.safetensors` (`score.weight` [1, hidden]) and `reward_model.json` (format,
max_length, head checksum), written last, each file atomically. `load_reward_model(run_dir)` returns the
scorer GRPO calls for `--reward rm:RUN_DIR`.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from dsv3.chat import encode_chat
from dsv3.checkpoint import from_pretrained, save_pretrained
from dsv3.io import atomic_write
from dsv3.model import Transformer
from dsv3.tasks import get_task
from dsv3.tasks.prompts import response_prefix
from dsv3.tokenizer import Tokenizer

FORMAT = "dsv3-reward-model"
VERSION = 1
HEAD_FILE = "reward_head.safetensors"
META_FILE = "reward_model.json"
BACKBONE_DIR = "model"
POOLS = ("eos", "answer")  # index = positions before the last token


# ------------------------------------------------------------------------------------------ numerics
def bradley_terry_loss(
    chosen: torch.Tensor, rejected: torch.Tensor, center_rewards_coefficient: float | None = None
) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean of -log sigmoid(r+ - r-) over pairs [N] (+ c * mean((r+ + r-)^2) when c is given), and stats:
    accuracy (share of pairs with r+ > r-; ties count as wrong), margin (mean r+ - r-), reward_mean."""
    if chosen.shape != rejected.shape or chosen.dim() != 1:
        raise ValueError(
            f"chosen and rejected rewards must both be [N], got {chosen.shape}, {rejected.shape}"
        )
    diff = chosen.float() - rejected.float()
    loss = -F.logsigmoid(diff).mean()
    if center_rewards_coefficient:
        loss = loss + center_rewards_coefficient * ((chosen.float() + rejected.float()) ** 2).mean()
    d = diff.detach()
    stats = {
        "accuracy": float((d > 0).float().mean()),
        "margin": float(d.mean()),
        "reward_mean": float(torch.cat([chosen, rejected]).detach().float().mean()),
    }
    return loss, stats


def pool_last(hidden: torch.Tensor, attention_mask: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """hidden [B, T, D] -> [B, D]: the hidden state at each row's last position where the mask is True
    (offset k > 0: k positions before it, clamped to the first)."""
    if attention_mask.shape != hidden.shape[:2]:
        raise ValueError(f"attention_mask {tuple(attention_mask.shape)} does not match hidden {hidden.shape}")
    if not bool(attention_mask.any(dim=1).all()):
        raise ValueError("every row needs at least one non-padding token")
    T = hidden.shape[1]
    pos = torch.arange(T, device=hidden.device).expand_as(attention_mask)
    last = (torch.where(attention_mask.bool(), pos, -1).amax(dim=1) - offset).clamp(min=0)  # [B]
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def collate(seqs: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> right-padded input_ids [B, T] int64 and attention_mask [B, T] bool."""
    if not seqs or any(len(s) == 0 for s in seqs):
        raise ValueError("collate needs at least one sequence and no empty one")
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(list(s), dtype=torch.long)
        mask[i, : len(s)] = True
    return ids, mask


class RewardModel(nn.Module):
    """A dsv3 Transformer backbone (held, not subclassed) and a scalar head on one hidden state per
    sequence: pool="eos" reads the last token (the EOS), pool="answer" the one before it (the response's
    last token, where a model tuned on the responses predicts the EOS)."""

    def __init__(self, backbone: Transformer, pool: str = "eos"):
        super().__init__()
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
        self.backbone = backbone
        self.pool = pool
        d = backbone.config.hidden_size
        self.score = nn.Linear(d, 1, bias=False)  # a bias cancels in r+ - r- (module docstring)
        nn.init.normal_(self.score.weight, std=1.0 / (d + 1) ** 0.5)  # as HF's score head
        self.score.to(backbone.embed.weight.dtype)

    @property
    def max_length(self) -> int:
        return self.backbone.config.max_position_embeddings

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [B, T] (right-padded where attention_mask [B, T] is False) -> rewards [B] float32."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        out = self.backbone(input_ids, with_mtp=False, logits_to_keep=1)  # LM head on one position only
        hidden = pool_last(out.hidden, attention_mask, POOLS.index(self.pool))
        return self.score(hidden).squeeze(-1).float()

    @torch.no_grad()
    def score_ids(self, seqs: Sequence[Sequence[int]], batch_size: int = 32, pad_id: int = 0) -> list[float]:
        """Rewards of token lists, in eval mode and without gradients; batched by length (less padding)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        was_training = self.training
        self.eval()
        device = self.score.weight.device
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        out = [0.0] * len(seqs)
        try:
            for k in range(0, len(order), batch_size):
                idx = order[k : k + batch_size]
                ids, mask = collate([seqs[i] for i in idx], pad_id)
                for i, r in zip(idx, self(ids.to(device), mask.to(device)).tolist()):
                    out[i] = float(r)
        finally:
            self.train(was_training)
        return out


# ------------------------------------------------------------------------------------------ encoding
def prompt_messages(prompt: Any) -> list[dict[str, Any]]:
    """A prompt as chat messages: a string is one user message; a list of messages is used as given."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
        return prompt
    raise ValueError(
        f"a prompt must be a string or a non-empty list of messages, got {type(prompt).__name__}"
    )


def response_text(response: Any) -> str:
    """A response as text: a string, or a list holding one assistant message with string content (TRL's
    conversational preference format)."""
    if isinstance(response, str):
        return response
    if (
        isinstance(response, list)
        and len(response) == 1
        and isinstance(response[0], dict)
        and response[0].get("role") == "assistant"
        and isinstance(response[0].get("content"), str)
    ):
        return response[0]["content"]
    raise ValueError("a response must be a string or a list of one assistant message with string content")


def encode_response(tokenizer: Tokenizer, prompt: Any, response: Any, max_length: int) -> list[int]:
    """Token ids the reward model reads for (prompt, response): module docstring."""
    ids, _ = encode_chat(tokenizer, prompt_messages(prompt), add_generation_prompt=True)
    text = response_text(response)
    prefix = response_prefix(tokenizer)
    if prefix and text.startswith(prefix):
        text = text[len(prefix) :]
    body, _ = tokenizer.encode_with_offsets(text)
    ids = ids + body
    eos = tokenizer.eos_id
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
    return ids[-max_length:]


# ------------------------------------------------------------------------------------------ save / load
def save_reward_model(
    model: RewardModel,
    tokenizer: Tokenizer,
    run_dir: str | Path,
    dtype: torch.dtype = torch.float32,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write the backbone (model/, HF format, with the tokenizer), the head and reward_model.json (last)."""
    run = Path(run_dir)
    save_pretrained(model.backbone, run / BACKBONE_DIR, dtype=dtype, tokenizer=tokenizer)
    head = save_safetensors({"score.weight": model.score.weight.detach().to("cpu", dtype).contiguous()})
    atomic_write(run / HEAD_FILE, head)
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "backbone": BACKBONE_DIR,
        "head": HEAD_FILE,
        "head_sha256": hashlib.sha256(head).hexdigest(),
        "hidden_size": model.backbone.config.hidden_size,
        "max_length": model.max_length,
        "pool": model.pool,
        **(extra or {}),
    }
    atomic_write(run / META_FILE, (json.dumps(meta, indent=2) + "\n").encode())
    return run


def read_meta(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / META_FILE
    if not path.is_file():
        raise ValueError(
            f"{run_dir} is not a reward model run directory (no {META_FILE}; train one: dsv3 rm)"
        )
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} file")
    if meta.get("version") != VERSION:
        raise ValueError(f"{path}: version {meta.get('version')!r} is not supported (expected {VERSION})")
    return meta


def load_reward_model_module(
    run_dir: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[RewardModel, Tokenizer, dict[str, Any]]:
    """(RewardModel in eval mode, its tokenizer, reward_model.json) from a `dsv3 rm` run directory."""
    run = Path(run_dir)
    meta = read_meta(run)
    head_path = run / meta["head"]
    try:
        head_bytes = head_path.read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read {head_path}: {e.strerror or e}") from None
    if hashlib.sha256(head_bytes).hexdigest() != meta["head_sha256"]:
        raise ValueError(f"{head_path} does not match the checksum in {META_FILE} (corrupt or replaced)")
    backbone = from_pretrained(run / meta["backbone"], dtype=dtype, device=device)
    if backbone.config.hidden_size != meta["hidden_size"]:
        raise ValueError(
            f"{run}: backbone hidden_size {backbone.config.hidden_size} != {meta['hidden_size']}"
        )
    model = RewardModel(backbone, meta.get("pool", "eos"))  # files written before `pool` read the EOS
    weight = load_safetensors(head_bytes)["score.weight"]
    with torch.no_grad():
        model.score.weight.copy_(weight.to(model.score.weight.dtype))
    model.to(device)
    tokenizer = Tokenizer.from_file(run / meta["backbone"] / "tokenizer.json")
    return model.eval(), tokenizer, meta


class RewardScorer:
    """`f(prompts, completions, completion_ids, **columns) -> list[float]`: GRPO's reward function contract.

    The reward model re-tokenizes prompt + completion text with its own tokenizer (completion_ids come from
    the policy's, which may differ) and scores them in batches without gradients."""

    def __init__(self, model: RewardModel, tokenizer: Tokenizer, max_length: int, batch_size: int = 32):
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.batch_size = batch_size
        self.pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0

    def __call__(
        self,
        prompts: Sequence[Any],
        completions: Sequence[Any],
        completion_ids: Sequence[Sequence[int]] | None = None,
        **columns: Any,
    ) -> list[float]:
        if len(prompts) != len(completions):
            raise ValueError(f"reward model: {len(prompts)} prompts for {len(completions)} completions")
        seqs = [encode_response(self.tokenizer, p, c, self.max_length) for p, c in zip(prompts, completions)]
        return self.model.score_ids(seqs, self.batch_size, self.pad_id)


def load_reward_model(
    run_dir: str | Path, device: torch.device | str = "cpu", batch_size: int = 32
) -> RewardScorer:
    """The scorer of a `dsv3 rm` run directory (for GRPO's `--reward rm:RUN_DIR`)."""
    model, tokenizer, meta = load_reward_model_module(run_dir, device)
    return RewardScorer(model, tokenizer, int(meta["max_length"]), batch_size)


# ------------------------------------------------------------------------------------------ add pairs
def corrupt_sum(a: int, b: int, rng: random.Random) -> int:
    """A plausible wrong sum of a + b: one digit off by one, a carry dropped or added (+-10^k), or the
    digit-wise sum without carries. Never the right answer, never negative."""
    s = a + b
    digits = str(s)
    cands: list[int] = []
    for k in range(len(digits)):  # one digit off by one
        for d in (-1, 1):
            v = int(digits[k]) + d
            if 0 <= v <= 9 and not (k == 0 and v == 0 and len(digits) > 1):
                cands.append(int(digits[:k] + str(v) + digits[k + 1 :]))
    for k in range(1, len(digits) + 1):  # a carry dropped or added into column k
        cands += [s - 10**k, s + 10**k]
    da, db = str(a).zfill(len(digits)), str(b).zfill(len(digits))
    cands.append(int("".join(str((int(x) + int(y)) % 10) for x, y in zip(da, db))))  # no carries
    cands = sorted({c for c in cands if c >= 0 and c != s})
    return rng.choice(cands)


def add_preference_pairs(
    n: int, digits: int = 2, split: str = "train", seed: int = 0
) -> list[dict[str, Any]]:
    """n preference records {"prompt", "chosen", "rejected"} on the add task's `split`: chosen is the right
    sum, rejected a corrupted one (`corrupt_sum`). The test split is the task's held-out problems."""
    task = get_task(f"add:digits={digits}")
    rng = random.Random(f"add-pairs|{digits}|{split}|{seed}")
    records = []
    for p in task.split(split, n, seed=seed):
        a, b = p.data["a"], p.data["b"]
        records.append({"prompt": p.prompt, "chosen": p.answer, "rejected": str(corrupt_sum(a, b, rng))})
    return records
