"""benchmarks/distill.py --quick end to end: base runs, teacher SFT with reasoning, `dsv3 distill`, two
students (distilled reasoning vs answers only, same prompts), held-out evaluation, one JSON result."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from dsv3.tasks import get_task


def _records(path: Path) -> list[list[dict]]:
    return [json.loads(line)["messages"] for line in path.read_text().splitlines() if line]


def test_quick_distillation_pipeline(tmp_path, capsys, load_benchmark):
    bench = load_benchmark("distill")
    result = bench.main(["--quick", "--work", str(tmp_path)])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last == result
    assert result["unit"] == "held-out greedy pass@1" and result["task"] == "add:digits=1"

    # distilled data: only verified teacher samples, each with non-empty reasoning before its answer
    task = get_task("add:digits=1")
    train = {p.prompt: p for p in task.split("train", result["distill_prompts"])}
    distilled = _records(tmp_path / "distilled.jsonl")
    assert len(distilled) == result["distilled_records"] > 0
    assert result["acceptance_rate"] == len(distilled) / (result["distill_prompts"] * result["samples"])
    for user, assistant in distilled:
        assert task.verify(train[user["content"]], assistant["content"])
        assert assistant["content"].startswith("<think>")  # the reasoning is kept
        reasoning = assistant["content"].split("</think>")[0].removeprefix("<think>").strip()
        assert reasoning

    # the baseline's data: the same prompts as often, reference answers only
    answers = _records(tmp_path / "answers.jsonl")
    assert Counter(u["content"] for u, _ in answers) == Counter(u["content"] for u, _ in distilled)
    for user, assistant in answers:
        assert "<think>" not in assistant["content"]
        assert assistant["content"] == train[user["content"]].answer

    # both students trained the same steps from the same base, evaluated on the held-out split
    for name in ("A", "B"):
        cfg = json.loads((tmp_path / f"student-{name}" / "train_config.json").read_text())
        assert cfg["train"]["steps"] == result["student_steps"]
        assert Path(cfg["train"]["init_from"]).name == "model"
        assert Path(cfg["train"]["init_from"]).parent.name == "student-base"
    assert 0.0 <= result["ours"] <= 1.0 and 0.0 <= result["baseline"] <= 1.0
    assert result["ratio"] == (result["ours"] / result["baseline"] if result["baseline"] else None)
    assert result["eval_problems"] == 6
    assert result["student_params"] < result["teacher_params"]
    assert result["ours_mean_response_tokens"] > 0 and result["baseline_mean_response_tokens"] > 0
