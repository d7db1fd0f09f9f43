"""The GRPO loop (report §5.2): rollouts on dsv3's engine over the policy's own tensors, rewards, the
clipped objective of `dsv3.rl.loss`, AdamW, checkpoints with exact resume. Composed, not inherited:

- policy: a `Transformer` loaded from a run or HF directory (fp32 master weights), with the CPU training
  speed paths; the MTP modules are frozen unless `mtp_weight > 0` (then they learn to predict the
  policy's own sampled completions, so speculative decoding keeps drafting well);
- rollouts: `dsv3.inference.LLM` over a *second* Transformer whose parameters ARE the policy's tensors
  (`load_state_dict(policy.state_dict(), assign=True)`). The engine swaps its CPU decode classes on that
  copy only; optimizer steps update the shared tensors in place, and the engine's derived decode caches
  are keyed on the tensors' version counters, so every rollout samples from the current weights with no
  copy and no reload;
- one step = one rollout of `prompts_per_step` prompts x `num_generations` completions, then
  `num_iterations` optimizer updates on it (with num_iterations > 1 the ratio is taken against the
  log-probs of the policy that sampled, computed once before the updates);
- log-probs for the loss come from the training forward (teacher-forced over prompt + completion, the
  completion tokens only, at the sampling temperature as TRL does); the gap to the engine's log-probs of
  the same tokens is logged (`logprob_gap_mean/max`: ~1e-6 in fp32, larger under bf16 autocast);
- beta > 0 keeps a frozen reference copy in memory for the k3 KL; beta = 0 keeps none;
- data: step s draws its prompts from a seed and s alone (a task's train split, or a prompts file in a
  seeded permutation per epoch), and each completion has its own sampling seed: a resumed run samples
  exactly what the uninterrupted run did. Checkpoints (dsv3.train.checkpoint, atomic) hold the policy,
  the optimizer, the reference model and the RNG state.

- data parallelism (`dsv3 grpo --nproc N`, torchrun): every rank holds a policy replica and an engine and
  samples its contiguous share of the step's completions with the single-process seeds; rewards are
  all-gathered so advantages are computed over whole groups, the loss is normalised by global counts and
  gradients are summed (dsv3.rl.ranks): N ranks take the single-process step. Rank 0 writes the metrics,
  checkpoints (one full replica, so a run resumes on any number of ranks) and the export;
- held-out evaluation (`eval_every` > 0, a task run): greedy pass@1 on the first `eval_samples` problems
  of the task's test split on the rollout engine (dsv3.tasks.evaluate_task), logged as `eval_accuracy`
  records of type "eval" at step 0 and every `eval_every` steps (rank 0).

Not done: the MoE balance biases stay fixed during RL; no tensor/expert parallelism of the policy (each
data-parallel rank holds the whole model and optimizer state).
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from dsv3.checkpoint import from_pretrained, resolve_model_dir, save_pretrained
from dsv3.cpu import apply_cpu_training
from dsv3.inference import LLM, SamplingParams
from dsv3.model import IGNORE_INDEX, Transformer, lm_loss
from dsv3.rl.config import GRPOConfig
from dsv3.rl.loss import LossStats, group_advantages, grpo_loss, token_logprobs
from dsv3.rl.prompts import PromptSource
from dsv3.rl.ranks import Ranks
from dsv3.rl.rewards import Reward, compute_rewards
from dsv3.tasks import EvalConfig, evaluate_task
from dsv3.tasks.prompts import response_prefix
from dsv3.tokenizer import Tokenizer
from dsv3.train.checkpoint import Checkpointer, step_dir_name
from dsv3.train.metrics import MetricsLog
from dsv3.train.optim import AdamW, clip_grads, grad_norm, param_groups
from dsv3.train.setup import prepare_run_dir
from dsv3.train.step import autocast_context


# --------------------------------------------------------------------------- rollouts
@dataclass
class Rollout:
    """One step's completions, rewards and advantages (N = prompts x G rows, a group's rows adjacent).

    The token lists are this rank's rows (`rows` of the N; all of them in one process); the tensors
    cover all N rows, gathered from every rank."""

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    completions: list[str]
    engine_logprobs: list[list[float]]
    truncated: list[bool]
    rewards_per_func: torch.Tensor  # [N, F]
    rewards: torch.Tensor  # [N]
    advantages: torch.Tensor  # [N]
    is_std_zero: torch.Tensor  # [N]
    seconds: float
    rows: slice  # this rank's rows of the N
    lengths: torch.Tensor  # [N] completion lengths in tokens
    truncated_all: torch.Tensor  # [N] bool


def shared_engine_model(policy: Transformer) -> Transformer:
    """A second Transformer whose parameters and buffers are the policy's own tensors (no copy)."""
    with torch.device("meta"):
        twin = Transformer(policy.config)
    twin.load_state_dict(policy.state_dict(), assign=True)
    twin.inv_freq = policy.inv_freq
    return twin


class GRPO:
    """The GRPO run: `GRPO(...).fit()` (see the module docstring)."""

    def __init__(
        self,
        policy: Transformer,
        tokenizer: Tokenizer,
        prompts: PromptSource,
        rewards: list[Reward],
        cfg: GRPOConfig,
        run_dir: str | Path,
        *,
        resume: bool = False,
        overwrite: bool = False,
        progress: bool = True,
        log: Any = print,
        ranks: Ranks | None = None,
    ):
        """ranks: this process's data-parallel group (None: a single process)."""
        self.cfg = cfg.validate()
        if not rewards:
            raise ValueError("GRPO needs at least one reward function")
        if cfg.eval_every and prompts.task is None:
            raise ValueError("eval_every needs a task (--task): the held-out split is the task's test split")
        self.ranks = ranks or Ranks()
        self.tokenizer, self.prompts, self.rewards = tokenizer, prompts, rewards
        self.log = log if self.ranks.is_main else _quiet
        self.run_dir = Path(run_dir)
        n = cfg.prompts_per_step * cfg.num_generations
        self.ranks.rows(n)  # n splits over the ranks, or a clear error
        main = self.ranks.is_main
        prepare_run_dir(
            self.run_dir, resume=resume, overwrite=overwrite, is_main=main, barrier=self.ranks.barrier
        )
        self.policy = policy.float().train()
        for p in self.policy.mtp.parameters():
            p.requires_grad_(cfg.mtp_weight > 0)
        self.device = policy.embed.weight.device
        self.ref = None
        if cfg.beta > 0:  # a frozen copy for the KL term; beta = 0 keeps none in memory
            self.ref = copy.deepcopy(self.policy).eval().requires_grad_(False)
        self.engine_model = shared_engine_model(self.policy)
        if self.device.type == "cpu":
            apply_cpu_training(self.policy, "padded")
            if self.ref is not None:
                apply_cpu_training(self.ref, "padded")
        max_len = min(
            policy.config.max_position_embeddings, cfg.max_prompt_length + cfg.max_completion_length
        )
        self.llm = LLM(
            self.engine_model, max_batch_size=n // self.ranks.world, max_seq_len=max_len, tokenizer=tokenizer
        )
        groups = param_groups(self.policy, cfg.weight_decay)
        self.opt = AdamW(
            groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.weight_decay
        )
        self.dtype = torch.float32 if cfg.dtype == "float32" else torch.bfloat16
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl", enabled=main)
        self.ckpt = Checkpointer(self.run_dir / "checkpoints", keep=cfg.keep_checkpoints, warn=log)
        self.step = 0
        self.progress = progress and main
        if resume:
            self._resume()
        if main:
            (self.run_dir / "grpo_config.json").write_text(json.dumps(cfg.to_dict(), indent=1) + "\n")

    # ------------------------------------------------------------------ rollout
    def rollout(self, step: int) -> Rollout:
        c, G = self.cfg, self.cfg.num_generations
        t0 = time.perf_counter()
        recs = self.prompts.batch(step, c.prompts_per_step)
        for r in recs:
            if len(r.ids) > c.max_prompt_length:
                raise ValueError(
                    f"a prompt has {len(r.ids)} tokens, over max_prompt_length={c.max_prompt_length}"
                )
        N = len(recs) * G
        mine = self.ranks.rows(N)
        params = [
            SamplingParams(
                max_new_tokens=c.max_completion_length,
                temperature=c.temperature,
                top_p=c.top_p,
                seed=(c.seed << 40) + step * len(recs) * G + i,
                logprobs=0,
                logprobs_mode="processed",
            )
            for i in range(mine.start, mine.stop)
        ]
        rows = [r for r in recs for _ in range(G)][mine]
        outs = self.llm.generate([r.ids for r in rows], params)
        prefix = response_prefix(self.tokenizer) if self.prompts.think else ""
        completions = [prefix + o.text for o in outs]
        completion_ids = [list(o.token_ids) for o in outs]
        columns = {k: [r.columns.get(k) for r in rows] for k in sorted({k for r in rows for k in r.columns})}
        per_func, total = compute_rewards(
            self.rewards, [r.prompt for r in rows], completions, completion_ids, columns
        )
        truncated = [o.finish_reason == "length" for o in outs]
        local = torch.cat(
            [
                per_func,
                total[:, None],
                torch.tensor([[len(x), t] for x, t in zip(completion_ids, truncated)], dtype=torch.float64),
            ],
            dim=1,
        )
        every = self.ranks.gather_rows(local)  # [N, F + 3]: the whole step's scores, every rank
        F = per_func.shape[1]
        per_func, total = every[:, :F], every[:, F]
        adv, zero = group_advantages(total, G, c.scale_rewards)  # over whole groups (and the whole batch)
        return Rollout(
            prompt_ids=[r.ids for r in rows],
            completion_ids=completion_ids,
            completions=completions,
            engine_logprobs=[list(o.logprobs or []) for o in outs],
            truncated=truncated,
            rewards_per_func=per_func,
            rewards=total,
            advantages=adv.float(),
            is_std_zero=zero,
            seconds=time.perf_counter() - t0,  # after the gather: the slowest rank's time
            rows=mine,
            lengths=every[:, F + 1].long(),
            truncated_all=every[:, F + 2] > 0,
        )

    # ------------------------------------------------------------------ training forward
    def _batch(self, ro: Rollout, rows: slice) -> dict[str, torch.Tensor]:
        """Right-padded prompt + completion ids [b, L], the completion tokens [b, Tc] with their mask and
        the index of the logits predicting each ([b, Tc] positions), the MTP labels [b, L]."""
        P = ro.prompt_ids[rows]
        C = ro.completion_ids[rows]
        b, Tc = len(P), max(1, max(len(c) for c in C))
        L = max(len(p) + len(c) for p, c in zip(P, C))
        ids = torch.zeros(b, L, dtype=torch.long)
        labels = torch.full((b, L), IGNORE_INDEX, dtype=torch.long)
        tokens = torch.zeros(b, Tc, dtype=torch.long)
        mask = torch.zeros(b, Tc)
        index = torch.zeros(b, Tc, dtype=torch.long)
        trunc = ro.truncated[rows]
        for i, (p, c) in enumerate(zip(P, C)):
            ids[i, : len(p) + len(c)] = torch.tensor(p + c)
            labels[i, len(p) - 1 : len(p) + len(c) - 1] = torch.tensor(c, dtype=torch.long)
            tokens[i, : len(c)] = torch.tensor(c, dtype=torch.long)
            keep = not (self.cfg.mask_truncated_completions and trunc[i])
            mask[i, : len(c)] = float(keep)
            index[i] = (len(p) - 1 + torch.arange(Tc)).clamp(max=L - 1)
        dev = self.device
        return {
            k: v.to(dev)
            for k, v in dict(ids=ids, labels=labels, tokens=tokens, mask=mask, index=index).items()
        }

    def _logprobs(
        self, model: Transformer, batch: dict[str, torch.Tensor], entropy: bool = False, mtp: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(log-probs [b, Tc], entropy or None, MTP loss) of the completion tokens under `model`."""
        # the head runs only from the first completion-predicting position on (not over the prompts);
        # lm_loss for the MTP loss wants every position
        index, L = batch["index"], batch["ids"].shape[1]
        first = 0 if mtp else int(index.min())
        with autocast_context(self.dtype, self.device):
            out = model(batch["ids"], with_mtp=mtp, logits_to_keep=L - first)
        logits = out.logits
        V = logits.shape[-1]
        picked = logits.gather(1, (index - first).unsqueeze(-1).expand(-1, -1, V))
        lp, ent = token_logprobs(picked, batch["tokens"], self.cfg.temperature, with_entropy=entropy)
        mtp_loss = lm_loss(out, batch["labels"], 1.0, 0.0, "none").mtp_loss if mtp else lp.new_zeros(())
        return lp, ent, mtp_loss

    def _micro(self, n: int) -> list[slice]:
        m = self.cfg.micro_batch or n
        return [slice(i, min(i + m, n)) for i in range(0, n, m)]

    def train_on(self, ro: Rollout) -> dict[str, Any]:
        """num_iterations optimizer updates on one rollout (this rank's rows); the step's training metrics.

        Micro-batch losses are weighted by global counts (all ranks' active tokens for dapo, all N rows
        otherwise) and gradients summed over ranks: the single-process gradient (dsv3.rl.ranks)."""
        c = self.cfg
        n, N = len(ro.completion_ids), len(ro.rewards)
        advantages = ro.advantages[ro.rows]
        t0 = time.perf_counter()
        parts = [self._batch(ro, s) for s in self._micro(n)]
        total_tokens = self.ranks.sum([sum(float(b["mask"].sum()) for b in parts)])[0]
        old: list[torch.Tensor | None] = [None] * len(parts)
        ref: list[torch.Tensor | None] = [None] * len(parts)
        with torch.no_grad():
            for j, b in enumerate(parts):
                if c.num_iterations > 1:
                    old[j] = self._logprobs(self.policy, b)[0]
                if self.ref is not None:
                    ref[j] = self._logprobs(self.ref, b)[0]
        rec: dict[str, Any] = {}
        for it in range(c.num_iterations):
            self.opt.zero_grad(set_to_none=True)
            acc: dict[str, float] = {}
            gaps: list[torch.Tensor] = []
            for j, (s, b) in enumerate(zip(self._micro(n), parts)):
                lp, ent, mtp_loss = self._logprobs(self.policy, b, entropy=True, mtp=c.mtp_weight > 0)
                old_lp = lp.detach() if old[j] is None else old[j]
                loss, st = grpo_loss(
                    lp,
                    old_lp,
                    ref[j],
                    advantages[s].to(self.device),
                    b["mask"],
                    loss_type=c.loss_type,
                    epsilon=c.epsilon,
                    epsilon_high=c.epsilon_high,
                    beta=c.beta,
                    max_completion_length=c.max_completion_length,
                    entropy=ent,
                )
                rows = s.stop - s.start
                scale = float(b["mask"].sum()) / max(total_tokens, 1.0) if c.loss_type == "dapo" else rows / N
                (loss * scale + c.mtp_weight * mtp_loss * rows / N).backward()
                _accumulate(acc, st, loss, mtp_loss, scale, float(b["mask"].sum()) / max(total_tokens, 1.0))
                if it == 0:
                    gaps.append(self._gap(ro, s, lp.detach(), b))
            params = [p for g in self.opt.param_groups for p in g["params"]]
            self.ranks.reduce_gradients(params)
            norm = grad_norm(params)
            if c.max_grad_norm > 0:
                clip_grads(params, c.max_grad_norm, norm)
            self.opt.step()
            if it == 0:
                keys = sorted(acc)
                g = torch.cat(gaps) if gaps else torch.zeros(1)
                summed = self.ranks.sum([acc[k] for k in keys] + [float(g.sum()), g.numel()])
                rec = dict(zip(keys, summed), grad_norm=float(norm))  # sums of global shares
                rec["logprob_gap_mean"] = summed[-2] / summed[-1]
                rec["logprob_gap_max"] = self.ranks.max([float(g.max())])[0]
        rec["train_tokens_per_s"] = c.num_iterations * total_tokens / max(time.perf_counter() - t0, 1e-9)
        return rec

    def _gap(self, ro: Rollout, s: slice, lp: torch.Tensor, b: dict[str, torch.Tensor]) -> torch.Tensor:
        """|training - engine| log-prob of every sampled token of rows s."""
        out = []
        for i, e in enumerate(ro.engine_logprobs[s]):
            if e:
                out.append((lp[i, : len(e)].cpu() - torch.tensor(e)).abs())
        return torch.cat(out) if out else torch.zeros(1)

    # ------------------------------------------------------------------ the loop
    def fit(self, stop_at: int | None = None) -> dict[str, Any]:
        c = self.cfg
        end = min(c.steps, stop_at) if stop_at is not None else c.steps
        if self.step == 0:
            self.metrics.write({"type": "run", "event": "start", "step": 0, "config": c.to_dict()})
            if c.eval_every:
                self.evaluate()
        bar = tqdm(
            total=c.steps,
            initial=self.step,
            desc="grpo",
            unit="step",
            dynamic_ncols=True,
            disable=not self.progress,
        )
        rec: dict[str, Any] = {}
        while self.step < end:
            t0 = time.perf_counter()
            ro = self.rollout(self.step)
            rec = self.step_metrics(ro)
            rec.update(self.train_on(ro))
            self.step += 1
            # wall seconds of the whole step (rollout, rewards, updates), the figure TRL users compare
            rec = {"type": "grpo", "step": self.step, **rec, "step_seconds": time.perf_counter() - t0}
            self.metrics.write(rec)
            if c.sample_every and self.step % c.sample_every == 0:
                self._log_samples(ro)
            bar.update(1)
            bar.set_postfix(
                reward=f"{rec['reward']:.3f}", kl=rec.get("kl"), len=f"{rec['completion_length_mean']:.1f}"
            )
            if c.eval_every and (self.step % c.eval_every == 0 or self.step == c.steps):
                self.evaluate()
            if self.step % c.checkpoint_every == 0 or self.step == end:
                self.save()
        bar.close()
        if self.step >= c.steps:
            self.export()
            self.metrics.write({"type": "run", "event": "stop", "step": self.step})
        return rec

    def evaluate(self) -> dict[str, Any] | None:
        """Greedy pass@1 on the task's held-out split, on the rollout engine (current weights); written as
        an "eval" record. Rank 0 evaluates, the other ranks go on (None there)."""
        if not self.ranks.is_main:
            return None
        assert self.prompts.task is not None
        c = self.cfg
        ec = EvalConfig(
            limit=c.eval_samples, samples=0, max_new_tokens=c.max_completion_length, think=self.prompts.think
        )
        m = evaluate_task(self.llm, self.prompts.task, ec)
        rec = {
            "type": "eval",
            "step": self.step,
            "eval_accuracy": m["greedy_pass@1"],
            "eval_well_formed": m["well_formed"],
            "eval_response_tokens": m["mean_response_tokens"],
            "eval_problems": m["problems"],
        }
        self.metrics.write(rec)
        return rec

    def step_metrics(self, ro: Rollout) -> dict[str, Any]:
        lens = ro.lengths.double()
        r = ro.rewards
        rec: dict[str, Any] = {
            "reward": float(torch.nanmean(r)),
            "reward_std": float(_std(r)),
            "frac_reward_zero_std": float(ro.is_std_zero.float().mean()),
            "completion_length_mean": float(lens.mean()),
            "completion_length_max": int(lens.max()),
            "truncated_frac": float(ro.truncated_all.float().mean()),
            "rollout_tokens_per_s": float(lens.sum()) / max(ro.seconds, 1e-9),
            "lr": self.cfg.lr,
        }
        for k, rw in enumerate(self.rewards):
            col = ro.rewards_per_func[:, k]
            rec[f"rewards/{rw.name}/mean"] = float(torch.nanmean(col))
            rec[f"rewards/{rw.name}/std"] = float(_std(col))
        return rec

    def _log_samples(self, ro: Rollout) -> None:
        for i in range(min(self.cfg.samples_logged, len(ro.completions))):
            self.metrics.write(
                {
                    "type": "sample",
                    "step": self.step,
                    "prompt": self.tokenizer.decode(ro.prompt_ids[i]),
                    "completion": ro.completions[i],
                    "reward": float(ro.rewards[ro.rows][i]),
                }
            )

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> Path:
        """Rank 0 writes the checkpoint (the replicas are equal: one full copy); all ranks wait for it."""
        state: dict[str, Any] = {
            "step": self.step,
            "optimizer": self.opt.state_dict(),
            "ref": None if self.ref is None else self.ref.state_dict(),
            "rng": torch.get_rng_state(),
            "config": self.cfg.to_dict(),
        }
        path = self.ckpt.root / step_dir_name(self.step)
        if self.ranks.is_main:
            path = self.ckpt.save(self.step, self.policy.state_dict(), state)
        self.ranks.barrier()
        return path

    def _resume(self) -> None:
        path = self.ckpt.latest()
        if path is None:
            raise ValueError(f"--resume: no usable checkpoint in {self.ckpt.root}")
        model_state, state = self.ckpt.load(path)
        free = {"steps", "checkpoint_every", "keep_checkpoints", "sample_every", "samples_logged"}
        free |= {"eval_every", "eval_samples"}
        now = self.cfg.to_dict()
        changed = sorted(k for k, v in state["config"].items() if k not in free and now.get(k) != v)
        if changed:
            diff = ", ".join(f"{k}: {state['config'][k]!r} -> {now.get(k)!r}" for k in changed)
            raise ValueError(f"--resume: settings differ from the checkpoint's ({diff})")
        with torch.no_grad():  # in place: the engine's model shares these tensors
            self.policy.load_state_dict(model_state)
        self.opt.load_state_dict(state["optimizer"])
        if self.ref is not None:
            if state["ref"] is None:
                raise ValueError("--resume: the checkpoint has no reference model (it was run with beta=0)")
            self.ref.load_state_dict(state["ref"])
        torch.set_rng_state(state["rng"])
        self.step = int(state["step"])
        self.metrics.truncate_after(self.step)
        self.metrics.write({"type": "run", "event": "resume", "step": self.step})
        self.log(f"grpo: resumed from {path} at step {self.step}")

    def export(self) -> Path:
        """RUN_DIR/model: the policy as an HF-format directory (fp32, config.json, tokenizer); rank 0."""
        path = self.run_dir / "model"
        if self.ranks.is_main:
            save_pretrained(self.policy, path, dtype=torch.float32, tokenizer=self.tokenizer)
        self.ranks.barrier()
        return path


def _quiet(msg: str) -> None:
    """The log of ranks other than 0."""


def _std(x: torch.Tensor) -> torch.Tensor:
    x = x[~torch.isnan(x)]
    return x.std() if x.numel() > 1 else torch.zeros(())


def _accumulate(
    acc: dict[str, float], st: LossStats, loss: torch.Tensor, mtp: torch.Tensor, scale: float, frac: float
) -> None:
    """Sum one micro-batch's loss (its share of the batch loss) and token-weighted statistics."""
    acc["loss"] = acc.get("loss", 0.0) + float(loss.detach()) * scale
    acc["mtp_loss"] = acc.get("mtp_loss", 0.0) + float(mtp.detach()) * scale
    for k, v in st.to_dict().items():
        if k != "tokens" and v is not None:
            acc[k] = acc.get(k, 0.0) + v * frac


def load_policy(src: str | Path) -> tuple[Transformer, Tokenizer, Path]:
    """The policy (fp32) and tokenizer of a run or HF model directory."""
    model_dir = resolve_model_dir(src)
    tok_path = model_dir / "tokenizer.json"
    if not tok_path.is_file():
        raise ValueError(f"{model_dir} has no tokenizer.json: GRPO renders chat prompts with it")
    return from_pretrained(model_dir, dtype=torch.float32), Tokenizer.from_file(str(tok_path)), model_dir
