"""GRPO's settings (TRL's names where TRL has one), validated before any work starts."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from dsv3.rl.loss import LOSS_TYPES, SCALE_REWARDS


@dataclass
class GRPOConfig:
    """GRPO settings (TRL's names where TRL has one). `steps` counts rollouts."""

    steps: int = 100
    prompts_per_step: int = 8
    num_generations: int = 8
    lr: float = 1e-6
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.99
    max_grad_norm: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    max_completion_length: int = 256
    max_prompt_length: int = 512
    mask_truncated_completions: bool = False
    num_iterations: int = 1
    beta: float = 0.0
    epsilon: float = 0.2
    epsilon_high: float | None = None
    loss_type: str = "dapo"
    scale_rewards: str = "group"
    mtp_weight: float = 0.0  # > 0: train the MTP modules on the rollouts (off by default)
    micro_batch: int = 0  # completions per forward/backward (0: the whole batch at once)
    dtype: str = "float32"  # training compute: float32 or bfloat16 autocast
    think: bool = True  # prompts open the think block (False: models tuned on bare answers)
    seed: int = 0
    checkpoint_every: int = 50
    keep_checkpoints: int = 3
    sample_every: int = 10  # log sample completions every N steps (0: never)
    samples_logged: int = 2
    eval_every: int = 0  # held-out greedy accuracy every N steps and at step 0 (0: never; a task run)
    eval_samples: int = 100  # held-out problems per evaluation

    def validate(self) -> GRPOConfig:
        d = self.to_dict()

        def positive(name: str) -> None:
            v = d[name]
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")

        for n in ("steps", "prompts_per_step", "num_generations", "max_completion_length"):
            positive(n)
        for n in ("max_prompt_length", "num_iterations", "checkpoint_every", "keep_checkpoints"):
            positive(n)
        if self.num_generations < 2:
            raise ValueError("num_generations must be >= 2: advantages compare completions of one prompt")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        if self.scale_rewards not in SCALE_REWARDS:
            raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS}, got {self.scale_rewards!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 (rollouts sample), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        for n in ("lr", "weight_decay", "beta", "epsilon", "mtp_weight", "max_grad_norm"):
            if d[n] < 0:
                raise ValueError(f"{n} must be >= 0, got {d[n]}")
        if self.epsilon_high is not None and self.epsilon_high < 0:
            raise ValueError(f"epsilon_high must be >= 0, got {self.epsilon_high}")
        if self.micro_batch < 0 or self.sample_every < 0 or self.samples_logged < 0 or self.eval_every < 0:
            raise ValueError("micro_batch, sample_every, samples_logged and eval_every must be >= 0")
        positive("eval_samples")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be float32 or bfloat16, got {self.dtype!r}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
