"""Reinforcement learning: GRPO (loss, rollouts, rewards) and the reward model.

from dsv3.rl import grpo_loss, group_advantages, GRPO, GRPOConfig, parse_rewards
"""

from dsv3.rl.config import GRPOConfig
from dsv3.rl.grpo import GRPO, Rollout, load_policy, shared_engine_model
from dsv3.rl.loss import LossStats, group_advantages, grpo_loss, token_logprobs
from dsv3.rl.prompts import PromptSource
from dsv3.rl.rewards import Reward, compute_rewards, parse_reward, parse_rewards, task_reward

__all__ = [
    "GRPO",
    "GRPOConfig",
    "LossStats",
    "PromptSource",
    "Reward",
    "Rollout",
    "compute_rewards",
    "group_advantages",
    "grpo_loss",
    "load_policy",
    "parse_reward",
    "parse_rewards",
    "shared_engine_model",
    "task_reward",
    "token_logprobs",
]
