"""GRPO after SFT on `add` (report §5.2 at small scale): is the gain RL's, and how fast is a GRPO step?

One run, every dsv3 stage through its CLI entry point or Python API in this process:

1. base: `dsv3 train --preset debug --steps 3` at hidden_size 128, 3 layers (0.4M parameters; a run
   directory with a tokenizer, weights near random);
2. SFT: `dsv3 sft` on gold bare-answer records of add:digits=D at a constant LR, stopped while held-out
   greedy accuracy is well below 1 (`acc_sft`); the control continues it at the same LR;
3. from that same SFT model: (a) GRPO (`dsv3.rl.GRPO`) for N steps with the task verifier as reward
   (`acc_grpo`), and (b) a control that continues SFT on the same data for the same wall-clock as (a)
   (`acc_control`): the gain is credited to RL only if (a) beats (b);
4. TRL's `GRPOTrainer` on the same SFT model (its HF export, loaded by transformers'
   DeepseekV3ForCausalLM, tokenizer.json through PreTrainedTokenizerFast), the same prompts (token ids
   checked equal), verifier, G, prompts per step, lr, beta, loss_type, epsilon, temperature, Adam betas,
   constant LR, N steps: held-out accuracy (`acc_trl`) and seconds per step at the add task's ~4 tokens;
5. the step-time comparison where generation dominates: both trainers from the base model on countdown with
   the think opening and max_completion_length 64 (a near-random model rarely stops early; both sample
   from the same weights, and the mean completion lengths are reported beside the times).

Held-out accuracy is greedy pass@1 on the first `--limit` problems of the task's test split (never trained
on): `dsv3 eval` for dsv3 runs, HF greedy `generate` for TRL's model (`acc_sft_hf` is the same HF scorer on
the SFT model: it must equal `acc_sft`, greedy decoding of the engine matches transformers).

    python benchmarks/grpo.py [--work DIR] [--quick] [--threads 1] [--grpo-steps 60] ...

Last line: JSON {ours: dsv3 s/step at 64 completion tokens, baseline: TRL's, ratio: baseline / ours,
unit, acc_sft, acc_grpo, acc_control, acc_trl, the 4-token step times, lengths, steps, wall times}.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from dsv3.cli import main as dsv3_main
from dsv3.rl import GRPO, GRPOConfig, PromptSource, load_policy, parse_rewards
from dsv3.tasks import Problem, Task, get_task, write_jsonl
from dsv3.tasks.prompts import prompt_ids, response_prefix
from dsv3.train.metrics import MetricsLog


def cli(argv: list[str]) -> tuple[dict[str, Any] | None, float]:
    """Run `dsv3 ARGV` in this process (stdout to stderr): (its last JSON line or None, wall seconds)."""
    print(f"$ dsv3 {' '.join(argv)}", file=sys.stderr, flush=True)
    buf = io.StringIO()
    t = time.perf_counter()
    with contextlib.redirect_stdout(buf):
        rc = dsv3_main(argv)
    seconds = time.perf_counter() - t
    sys.stderr.write(buf.getvalue())
    if rc != 0:
        raise SystemExit(f"dsv3 {argv[0]} failed with exit code {rc}")
    lines = [x for x in buf.getvalue().splitlines() if x.startswith("{")]
    return (json.loads(lines[-1]) if lines else None), seconds


def evaluate(run: Path, spec: str, limit: int, think: bool, max_new: int) -> float:
    args = ["eval", "--checkpoint", str(run), "--task", spec, "--samples", "0", "--limit", str(limit)]
    args += ["--max-new-tokens", str(max_new)] + ([] if think else ["--no-think"])
    out, _ = cli(args)
    assert out is not None
    return float(out["greedy_pass@1"])


class TimedLog(MetricsLog):
    """metrics.jsonl that also notes the time each GRPO step record is written (one per step)."""

    def __init__(self, path: Path):
        super().__init__(path)
        self.times: list[float] = [time.perf_counter()]

    def write(self, record: dict[str, Any]) -> None:
        super().write(record)
        if record.get("type") == "grpo":
            self.times.append(time.perf_counter())


def step_stats(times: list[float]) -> dict[str, float]:
    """Per-step seconds from step boundaries; the median skips step 1 (warm-up) when there are more."""
    d = [b - a for a, b in zip(times, times[1:])]
    rest = d[1:] or d
    return {"s_per_step": statistics.median(rest), "first_step_s": d[0], "seconds": times[-1] - times[0]}


def run_ours(src: Path, out: Path, spec: str, think: bool, steps: int, settings: dict[str, Any]) -> dict:
    """dsv3's GRPO (Python API, as `dsv3 grpo` builds it) with per-step timing."""
    cfg = GRPOConfig(steps=steps, think=think, sample_every=0, checkpoint_every=10**6, **settings)
    policy, tok, _ = load_policy(src)
    task = get_task(spec)
    prompts = PromptSource(tok, task=task, think=think, seed=cfg.seed)
    rl = GRPO(policy, tok, prompts, parse_rewards([], task), cfg, out, overwrite=True, progress=False)
    rl.metrics = log = TimedLog(out / "metrics.jsonl")
    log.times = [time.perf_counter()]
    rl.fit()
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    recs = [r for r in recs if r.get("type") == "grpo"]
    lens = [r["completion_length_mean"] for r in recs]
    rewards = [r["reward"] for r in recs]
    k = max(1, len(rewards) // 5)
    return {
        **step_stats(log.times),
        "completion_length_mean": sum(lens) / len(lens),
        "reward_first": sum(rewards[:k]) / k,
        "reward_last": sum(rewards[-k:]) / k,
    }


# ------------------------------------------------------------------------------------------ TRL
def trl_prompts(model_dir: Path, task: Task, n: int, think: bool, seed: int) -> tuple[list[dict], Any]:
    """TRL's dataset (prompt text as dsv3 renders it, token ids checked equal) and its tokenizer."""
    from transformers import PreTrainedTokenizerFast

    from dsv3.tokenizer import Tokenizer

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    hf_tok = PreTrainedTokenizerFast(tokenizer_file=str(model_dir / "tokenizer.json"))
    hf_tok.pad_token_id = tok.pad_id if tok.pad_id is not None else 0
    hf_tok.eos_token = hf_tok.convert_ids_to_tokens(tok.eos_id)
    rows = []
    for p in task.split("train", n, seed=seed):
        ids = prompt_ids(tok, p, think=think)
        text = hf_tok.decode(ids, skip_special_tokens=False)
        if hf_tok(text=[text])["input_ids"][0] != ids:
            raise SystemExit(f"TRL would tokenize the prompt {text!r} differently from dsv3")
        rows.append({"prompt": text, "key": p.key})
    return rows, hf_tok


def trl_reward(task: Task, problems: dict[str, Problem], prefix: str):
    def reward(prompts, completions, key, **_: Any) -> list[float]:
        return [task.reward(problems[k], prefix + c) for k, c in zip(key, completions)]

    reward.__name__ = f"task_{task.name}"
    return reward


def run_trl(
    src: Path, out: Path, spec: str, think: bool, steps: int, s: dict[str, Any], threads: int
) -> dict:
    """TRL's GRPOTrainer on dsv3's HF export with the same settings; per-step timing by a callback."""
    import datasets
    import transformers
    from transformers import DeepseekV3ForCausalLM, TrainerCallback
    from trl import GRPOConfig as TRLConfig
    from trl import GRPOTrainer

    transformers.logging.set_verbosity_error()
    model_dir = src / "model"
    task = get_task(spec)
    n = steps * s["prompts_per_step"]
    rows, hf_tok = trl_prompts(model_dir, task, max(n, 64), think, s.get("seed", 0))
    problems = {p.key: p for p in task.split("train", max(n, 64), seed=s.get("seed", 0))}
    from dsv3.tokenizer import Tokenizer

    prefix = response_prefix(Tokenizer.from_file(str(model_dir / "tokenizer.json"))) if think else ""
    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            times.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter())

    G, P = s["num_generations"], s["prompts_per_step"]
    cfg = TRLConfig(
        output_dir=str(out), use_cpu=True, bf16=False, report_to="none", save_strategy="no",
        logging_steps=1, max_steps=steps, per_device_train_batch_size=P * G, gradient_accumulation_steps=1,
        num_generations=G, max_completion_length=s["max_completion_length"], learning_rate=s["lr"],
        lr_scheduler_type="constant", warmup_steps=0, beta=s["beta"], loss_type=s["loss_type"],
        epsilon=0.2, temperature=s.get("temperature", 1.0), top_p=1.0, adam_beta1=0.9, adam_beta2=0.99,
        weight_decay=0.0, max_grad_norm=1.0, scale_rewards="group", seed=s.get("seed", 0),
        dataloader_num_workers=0, disable_tqdm=True,
    )  # fmt: skip
    model = DeepseekV3ForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=trl_reward(task, problems, prefix),
        args=cfg,
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=hf_tok,
        callbacks=[Timer()],
    )
    torch.set_num_threads(threads)
    trainer.train()
    hist = [h for h in trainer.state.log_history if "reward" in h]
    step_s = [b - a for a, b in zip(times[::2], times[1::2])]
    lens = [h.get("completions/mean_length", float("nan")) for h in hist]
    return {
        "s_per_step": statistics.median(step_s[1:] or step_s),
        "first_step_s": step_s[0],
        "seconds": sum(step_s),
        "completion_length_mean": sum(lens) / max(1, len(lens)),
        "reward_first": hist[0]["reward"] if hist else None,
        "reward_last": hist[-1]["reward"] if hist else None,
        "model": trainer.model.eval(),
        "tokenizer": hf_tok,
    }


@torch.no_grad()
def hf_accuracy(model: Any, hf_tok: Any, src: Path, spec: str, limit: int, max_new: int) -> float:
    """Greedy pass@1 of a transformers model on the task's held-out split (left-padded batches)."""
    from dsv3.tokenizer import Tokenizer

    tok = Tokenizer.from_file(str(src / "model" / "tokenizer.json"))
    task = get_task(spec)
    problems = task.split("test", limit)
    right = 0
    for k in range(0, len(problems), 32):
        chunk = problems[k : k + 32]
        ids = [prompt_ids(tok, p, think=False) for p in chunk]
        T = max(map(len, ids))
        x = torch.tensor([[hf_tok.pad_token_id] * (T - len(i)) + i for i in ids])
        mask = torch.tensor([[0] * (T - len(i)) + [1] * len(i) for i in ids])
        out = model.generate(
            input_ids=x, attention_mask=mask, max_new_tokens=max_new, do_sample=False,
            eos_token_id=tok.eos_id, pad_token_id=hf_tok.pad_token_id,
        )  # fmt: skip
        for p, row in zip(chunk, out[:, T:].tolist()):
            row = row[: row.index(tok.eos_id)] if tok.eos_id in row else row  # EOS, then padding
            right += task.verify(p, tok.decode(row))
    return right / len(problems)


# ------------------------------------------------------------------------------------------ main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=None, help="work directory (default: a temporary one)")
    ap.add_argument("--quick", action="store_true", help="a smoke run: few steps of everything")
    ap.add_argument("--digits", type=int, default=2)
    ap.add_argument("--hidden-size", type=int, default=128, help="the debug preset's width (64 there)")
    ap.add_argument("--layers", type=int, default=3, help="the debug preset's layers (2 there)")
    ap.add_argument("--sft-records", type=int, default=3000)
    ap.add_argument("--sft-steps", type=int, default=450)
    ap.add_argument("--sft-lr", default="3e-3")
    ap.add_argument("--grpo-steps", type=int, default=100)
    ap.add_argument("--long-steps", type=int, default=6, help="GRPO steps timed at 64 completion tokens")
    ap.add_argument("--num-generations", type=int, default=8)
    ap.add_argument("--prompts-per-step", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--loss-type", default="dapo")
    ap.add_argument("--limit", type=int, default=200, help="held-out problems scored")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for every stage")
    ap.add_argument("--no-trl", action="store_true", help="skip TRL (dsv3 only)")
    a = ap.parse_args()
    if a.quick:
        a.sft_steps, a.grpo_steps, a.long_steps, a.limit, a.sft_records = 40, 3, 2, 20, 400
    torch.set_num_threads(a.threads)
    work = Path(a.work or tempfile.mkdtemp(prefix="grpo_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    spec = f"add:digits={a.digits}"
    t_start = time.perf_counter()
    base, sft, data = work / "base", work / "sft", work / "sft.jsonl"
    model = [f"hidden_size={a.hidden_size}", f"num_hidden_layers={a.layers}"]
    cli(["train", "--preset", "debug", "--steps", "3", "--out", str(base), "--overwrite", "--no-progress",
         "--no-sample", *model])  # fmt: skip
    write_jsonl(data, get_task(spec).sft_records(a.sft_records))
    sft_args = ["sft", "--data", str(data), "--no-progress", "--overwrite"]
    sft_settings = [
        "seq_len=64",
        "batch_size=16",
        f"lr={a.sft_lr}",
        "decay_start_frac=1.0",
        "decay_end_frac=1.0",
    ]
    _, sft_s = cli(
        [*sft_args, "--from", str(base), "--out", str(sft), "--steps", str(a.sft_steps), *sft_settings]
    )
    acc_sft = evaluate(sft, spec, a.limit, False, 8)

    settings = {
        "num_generations": a.num_generations,
        "prompts_per_step": a.prompts_per_step,
        "lr": a.lr,
        "beta": 0.0,
        "loss_type": a.loss_type,
        "temperature": 1.0,
        "max_completion_length": 8,
    }
    ours = run_ours(sft, work / "grpo", spec, False, a.grpo_steps, settings)
    acc_grpo = evaluate(work / "grpo", spec, a.limit, False, 8)

    # control: SFT continued from the SFT model for GRPO's wall-clock, at the SFT run's measured pace
    control_steps = max(1, round(ours["seconds"] / (sft_s / a.sft_steps)))
    _, control_s = cli(
        [*sft_args, "--from", str(sft), "--out", str(work / "control"), "--steps", str(control_steps),
         *sft_settings]
    )  # fmt: skip
    acc_control = evaluate(work / "control", spec, a.limit, False, 8)

    long = {**settings, "max_completion_length": 64}
    ours64 = run_ours(base, work / "grpo64", "countdown", True, a.long_steps, long)
    result: dict[str, Any] = {"ours": round(ours64["s_per_step"], 4), "baseline": None, "ratio": None}
    result["unit"] = "s/step"
    trl = trl64 = None
    if not a.no_trl:
        trl = run_trl(sft, work / "trl", spec, False, a.grpo_steps, settings, a.threads)
        acc_trl = hf_accuracy(trl.pop("model"), trl.pop("tokenizer"), sft, spec, a.limit, 8)
        trl64 = run_trl(base, work / "trl64", "countdown", True, a.long_steps, long, a.threads)
        trl64.pop("model"), trl64.pop("tokenizer")
        from transformers import DeepseekV3ForCausalLM

        sft_hf = DeepseekV3ForCausalLM.from_pretrained(sft / "model", dtype=torch.float32).eval()
        result["baseline"] = round(trl64["s_per_step"], 4)
        result["ratio"] = round(trl64["s_per_step"] / ours64["s_per_step"], 3)
        result["acc_trl"] = acc_trl
        result["acc_sft_hf"] = hf_accuracy(sft_hf, trl_prompts(sft / "model", get_task(spec), 1, False, 0)[1],
                                           sft, spec, a.limit, 8)  # fmt: skip
    result.update(
        acc_sft=acc_sft,
        acc_grpo=acc_grpo,
        acc_control=acc_control,
        ours_s_per_step_add=round(ours["s_per_step"], 4),
        baseline_s_per_step_add=round(trl["s_per_step"], 4) if trl else None,
        ours_len64=round(ours64["completion_length_mean"], 1),
        baseline_len64=round(trl64["completion_length_mean"], 1) if trl64 else None,
        grpo_reward_first_last=[round(ours["reward_first"], 3), round(ours["reward_last"], 3)],
        trl_reward_first_last=[trl["reward_first"], trl["reward_last"]] if trl else None,
        task=spec,
        sft_steps=a.sft_steps,
        grpo_steps=a.grpo_steps,
        control_steps=control_steps,
        grpo_seconds=round(ours["seconds"], 1),
        control_seconds=round(control_s, 1),
        G=a.num_generations,
        prompts_per_step=a.prompts_per_step,
        lr=a.lr,
        loss_type=a.loss_type,
        beta=0.0,
        threads=a.threads,
        wall_s=round(time.perf_counter() - t_start, 1),
        work=str(work),
    )
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
