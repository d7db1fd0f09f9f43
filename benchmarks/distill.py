"""Distillation by rejection sampling (report §5.1, Table 9, at small scale): reasoning vs answers only.

A teacher is fine-tuned to add multi-digit numbers with a column-addition scratchpad in a think block
(`dsv3.tasks` `add`: one line per column with its carry). `dsv3 distill` samples K responses per
training prompt from it and keeps the ones the verifier accepts (reasoning required). A smaller student
is then fine-tuned twice from the same base run, with the same steps, LR and batch:

- student A (ours): on the distilled data, the teacher's reasoning before each answer;
- student B (baseline): on the same prompts, the same number of records, answers only (no think block).

Both are scored by `dsv3 eval` on the task's held-out split (problems no stage trained on): greedy
pass@1, pass@K and mean response length in tokens. The report's Table 9 shape is accuracy up and
responses longer for the student trained on the teacher's reasoning. Every stage is the CLI's own entry
point (`dsv3.cli.main`) in one work directory:

    python benchmarks/distill.py [--work DIR] [--quick] [--task add:digits=3] [--samples 4] ...

Last line: JSON {ours: student A held-out greedy pass@1, baseline: student B's, ratio, unit, acceptance
rate, mean response tokens of both, teacher accuracy, model sizes, steps, wall time}.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from dsv3.cli import main as dsv3_main
from dsv3.tasks import get_task, write_jsonl


def cli(argv: list[str], times: dict[str, float], stage: str) -> dict[str, Any] | None:
    """Run `dsv3 ARGV` in this process (its wall time added to times[stage]); its stdout goes to stderr,
    its last JSON line (if any) is returned."""
    print(f"$ dsv3 {' '.join(argv)}", file=sys.stderr, flush=True)
    buf = io.StringIO()
    t = time.perf_counter()
    with contextlib.redirect_stdout(buf):
        rc = dsv3_main(argv)
    times[stage] = round(times.get(stage, 0.0) + time.perf_counter() - t, 1)
    text = buf.getvalue()
    sys.stderr.write(text)
    if rc != 0:
        raise SystemExit(f"dsv3 {argv[0]} failed with exit code {rc}")
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return None


def num_params(run: Path) -> int:
    """Parameters of the exported model without its MTP layer (SFT and evaluation never use it)."""
    n_layers = json.loads((run / "model" / "config.json").read_text())["num_hidden_layers"]
    mtp = tuple(f"model.layers.{i}." for i in range(n_layers, n_layers + 8))
    with safe_open(str(run / "model" / "model.safetensors"), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys() if not k.startswith(mtp))  # noqa: SIM118


def answers_only(task_spec: str, distilled: Path, limit: int, seed: int) -> list[dict[str, Any]]:
    """Student B's data: for every distilled record, the same prompt with its reference answer alone
    (same problems, same multiplicity, no reasoning)."""
    task = get_task(task_spec)
    by_prompt = {p.prompt: p for p in task.split("train", limit, seed=seed)}
    counts = Counter(
        json.loads(line)["messages"][0]["content"] for line in distilled.read_text().splitlines() if line
    )
    records = []
    for prompt, n in counts.items():
        problem = by_prompt[prompt]
        msgs = [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": task.reference_response(problem, reasoning=False)},
        ]
        records += [{"messages": msgs}] * n
    return records


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default=None, help="work directory (default: a temporary one, removed)")
    p.add_argument("--quick", action="store_true", help="a ~1-2 minute smoke run (tiny sizes and steps)")
    p.add_argument("--task", default=None, help="task spec (default add:digits=3; --quick: add:digits=1)")
    p.add_argument("--teacher", nargs="*", default=None, help="teacher preset and key=value model sizes")
    p.add_argument("--student", nargs="*", default=None, help="student preset and key=value model sizes")
    p.add_argument("--base-steps", type=int, default=None, help="pre-training steps of each base run")
    p.add_argument("--teacher-records", type=int, default=None, help="gold reasoning records for the teacher")
    p.add_argument("--teacher-steps", type=int, default=None, help="teacher SFT steps")
    p.add_argument("--teacher-lr", type=float, default=3e-3)
    p.add_argument("--prompts", type=int, default=None, help="training prompts distilled from the teacher")
    p.add_argument("--samples", type=int, default=4, help="K teacher samples per prompt")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--student-steps", type=int, default=None, help="SFT steps of each student")
    p.add_argument("--student-lr", type=float, default=3e-3)
    p.add_argument("--batch-size", type=int, default=None, help="SFT rows per step (default 16)")
    p.add_argument("--seq-len", type=int, default=None, help="SFT packed row length (default 256)")
    p.add_argument("--eval-limit", type=int, default=None, help="held-out problems evaluated")
    p.add_argument("--eval-samples", type=int, default=4, help="K for pass@K in evaluation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: on a shared 2-core CPU two threads per process oversubscribe it, "
        "and a debug-size step then takes 10x longer)",
    )
    args = p.parse_args(argv)
    full = {
        "teacher": ["debug", "hidden_size=128", "num_hidden_layers=3"],
        "student": ["debug"],
        "base_steps": 30,
        "teacher_records": 4000,
        "teacher_steps": 600,
        "prompts": 600,
        "student_steps": 400,
        "eval_limit": 200,
        "task": "add:digits=3",
        "batch_size": 16,
        "seq_len": 256,
    }
    quick = {  # 1-digit sums: a debug teacher learns them in a few hundred short steps
        "task": "add:digits=1",
        "teacher": ["debug"],
        "student": ["debug", "num_hidden_layers=1"],
        "base_steps": 3,
        "teacher_records": 49,
        "teacher_steps": 250,
        "prompts": 24,
        "student_steps": 30,
        "eval_limit": 6,  # of the 6 held-out 1-digit problems
        "batch_size": 8,
        "seq_len": 128,
    }
    for k, v in (quick if args.quick else full).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    t0 = time.perf_counter()
    torch.set_num_threads(args.threads)
    times: dict[str, float] = {}
    task = args.task
    sft_opts = [f"lr={args.student_lr}", f"batch_size={args.batch_size}", f"seq_len={args.seq_len}"]

    # (1) base runs: a few steps of pre-training give each model a tokenizer and a run directory
    runs = {}
    for who, spec in (("teacher", args.teacher), ("student", args.student)):
        preset, sizes = spec[0], spec[1:]
        runs[who] = work / f"{who}-base"
        cli(
            ["train", "--preset", preset, "--steps", str(args.base_steps), "--out", str(runs[who])]
            + ["--overwrite", "--no-progress", "--no-sample", *sizes],
            times,
            "base",
        )

    # (2) the teacher learns the task with its scratchpad from gold reasoning records
    gold = work / "teacher-gold.jsonl"
    write_jsonl(gold, get_task(task).sft_records(args.teacher_records, reasoning=True, seed=args.seed + 1))
    teacher = work / "teacher"
    cli(
        ["sft", "--from", str(runs["teacher"]), "--data", str(gold), "--out", str(teacher)]
        + ["--steps", str(args.teacher_steps), "--overwrite", "--no-progress"]
        + [f"lr={args.teacher_lr}", f"batch_size={args.batch_size}", f"seq_len={args.seq_len}"],
        times,
        "teacher_sft",
    )

    # (3) rejection sampling: K samples per training prompt, kept when verified and reasoned
    distilled = work / "distilled.jsonl"
    dist = cli(
        ["distill", "--teacher", str(teacher), "--task", task, "--samples", str(args.samples)]
        + ["--temperature", str(args.temperature), "--limit", str(args.prompts), "--seed", str(args.seed)]
        + ["--require-think", "--max-new-tokens", "128", "--out", str(distilled)],
        times,
        "distill",
    )
    assert dist is not None
    rate = f"{dist['acceptance_rate']:.3f} ({dist['accepted']}/{dist['samples']})"
    print(f"acceptance rate: {rate}", flush=True)
    if dist["accepted"] == 0:
        raise SystemExit("the teacher produced no accepted sample: train it longer (--teacher-steps)")

    # (4) two students from the same base, same steps and LR: teacher reasoning vs answers only
    answers = work / "answers.jsonl"
    write_jsonl(answers, answers_only(task, distilled, args.prompts, args.seed))
    students = {"A": (distilled, []), "B": (answers, ["--no-think"])}
    for name, (data, _) in students.items():
        out = work / f"student-{name}"
        cli(
            ["sft", "--from", str(runs["student"]), "--data", str(data), "--out", str(out)]
            + ["--steps", str(args.student_steps), "--overwrite", "--no-progress", *sft_opts],
            times,
            f"student_{name}_sft",
        )

    # (5) held-out evaluation
    ev = ["--task", task, "--limit", str(args.eval_limit), "--samples", str(args.eval_samples)]
    ev += ["--temperature", str(args.temperature), "--seed", str(args.seed)]
    scores = {"teacher": cli(["eval", "--checkpoint", str(teacher), *ev], times, "eval")}
    for name, (_, flags) in students.items():
        run_dir = str(work / f"student-{name}")
        scores[name] = cli(["eval", "--checkpoint", run_dir, *ev, *flags], times, "eval")
    K = args.eval_samples
    a, b, t = scores["A"], scores["B"], scores["teacher"]
    assert a is not None and b is not None and t is not None
    ours, base = a["greedy_pass@1"], b["greedy_pass@1"]
    return {
        "benchmark": "distill",
        "task": task,
        "ours": ours,
        "baseline": base,
        "ratio": ours / base if base else None,
        "unit": "held-out greedy pass@1",
        f"ours_pass@{K}": a.get(f"pass@{K}"),
        f"baseline_pass@{K}": b.get(f"pass@{K}"),
        "ours_mean_response_tokens": a["mean_response_tokens"],
        "baseline_mean_response_tokens": b["mean_response_tokens"],
        "ours_well_formed": a["well_formed"],
        "baseline_well_formed": b["well_formed"],
        "teacher_greedy_pass@1": t["greedy_pass@1"],
        f"teacher_pass@{K}": t.get(f"pass@{K}"),
        "teacher_mean_response_tokens": t["mean_response_tokens"],
        "acceptance_rate": dist["acceptance_rate"],
        "distilled_records": dist["accepted"],
        "distill_prompts": dist["prompts"],
        "samples": args.samples,
        "temperature": args.temperature,
        "eval_problems": a["problems"],
        "teacher_params": num_params(teacher),
        "student_params": num_params(work / "student-A"),
        "teacher": " ".join(args.teacher),
        "student": " ".join(args.student),
        "base_steps": args.base_steps,
        "teacher_records": args.teacher_records,
        "teacher_steps": args.teacher_steps,
        "student_steps": args.student_steps,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "student_lr": args.student_lr,
        "stage_s": times,
        "wall_s": round(time.perf_counter() - t0, 1),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.work is None:
        with tempfile.TemporaryDirectory(prefix="distill-") as d:
            result = run(args, Path(d))
    else:
        work = Path(args.work)
        work.mkdir(parents=True, exist_ok=True)
        result = run(args, work)
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
