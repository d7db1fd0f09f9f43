"""`dsv3 eval` and `dsv3 distill`: pass@k math, prompts rendered through the chat template, rejection
sampling keeping only verified samples, and both CLIs end to end on a tiny random model."""

import json
import math
import re
import sys
import textwrap
from importlib import resources
from itertools import combinations

import pytest
import torch

from dsv3 import ModelConfig, Transformer
from dsv3.chat import ASSISTANT, THINK_BEGIN
from dsv3.checkpoint import save_pretrained
from dsv3.cli import main
from dsv3.inference import RequestOutput
from dsv3.tasks import (
    DistillConfig,
    EvalConfig,
    acceptor,
    evaluate_task,
    get_task,
    pass_at_k,
    rejection_sample,
)
from dsv3.tasks import distill as distill_mod
from dsv3.tasks.prompts import prompt_ids, response_prefix
from dsv3.tokenizer import Tokenizer

EVAL_KEYS = {
    "task",
    "split",
    "problems",
    "greedy_pass@1",
    "well_formed",
    "mean_response_tokens",
    "samples",
    "temperature",
    "pass@1",
    "mean_reward",
    "sampled_mean_response_tokens",
}


@pytest.fixture(scope="module")
def tokenizer():
    text = (resources.files("dsv3.data") / "tinyshakespeare.txt").read_text()[:20000]
    digits = " ".join(f"What is {a}+{b}? {a + b}" for a in range(0, 100, 7) for b in range(3, 100, 11))
    return Tokenizer.train([text, digits], ModelConfig.from_preset("debug").vocab_size)


@pytest.fixture(scope="module")
def run_dir(tokenizer, tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("run") / "model"
    save_pretrained(
        Transformer(ModelConfig.from_preset("debug")), path, dtype=torch.float32, tokenizer=tokenizer
    )
    return path


class StubLLM:
    """Answers `What is a+b?` prompts: greedy correctly, sample j correctly when j < n_correct(a, b), else
    wrong (well formed) or malformed. Records every request."""

    def __init__(self, tokenizer, n_correct, think=True):
        self.tokenizer, self.n_correct, self.think, self.requests = tokenizer, n_correct, think, []
        self.bare = False  # answer with the bare sum (a model tuned without reasoning)

    def generate(self, prompts, params):
        outs, count = [], {}
        for ids, p in zip(prompts, params):
            self.requests.append((list(ids), p))
            a, b = map(int, re.search(r"What is (\d+)\+(\d+)\?", self.tokenizer.decode(ids)).groups())
            j = count.get((a, b), 0) if p.temperature > 0 else -1
            if p.temperature > 0:
                count[(a, b)] = j + 1
            if self.bare:
                text = f"{a + b}"
            elif j < self.n_correct(a, b):
                text = f"{a}+{b}\n</think>\n{a + b}" if self.think else f"</think>\n{a + b}"
            elif j % 2:
                text = f"guess\n</think>\n{a + b + 1}"
            else:
                text = "no idea"  # the think block never closes: malformed
            outs.append(
                RequestOutput(
                    request_id=str(len(outs)),
                    prompt=None,
                    prompt_token_ids=list(ids),
                    token_ids=self.tokenizer.encode(text),
                    text=text,
                    finished=True,
                    finish_reason="stop",
                )
            )
        return outs


def test_pass_at_k_matches_enumeration():
    for n in range(1, 7):
        for c in range(n + 1):
            for k in range(1, n + 1):
                subsets = list(combinations(range(n), k))
                exact = sum(any(i < c for i in s) for s in subsets) / len(subsets)
                assert pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12)
                assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k))
    assert pass_at_k(200, 1, 1) == pytest.approx(1 / 200)
    with pytest.raises(ValueError, match="pass@k"):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError, match="pass@k"):
        pass_at_k(4, 1, 5)


def test_prompts_are_chat_rendered(tokenizer):
    task = get_task("add:digits=2")
    p = task.split("test", 1)[0]
    ids = prompt_ids(tokenizer, p)
    assert ids[0] == tokenizer.bos_id
    assert tokenizer.token_id(ASSISTANT) in ids and ids[-2] == tokenizer.token_id(THINK_BEGIN)
    assert p.prompt in tokenizer.decode(ids)
    assert response_prefix(tokenizer) == "<think>\n"
    bare = prompt_ids(tokenizer, p, think=False)
    assert bare[-1] == tokenizer.token_id(ASSISTANT) and ids[: len(bare)] == bare


def test_no_think_prompts_and_responses(tokenizer):
    """think=False: prompts end at <｜Assistant｜> and the response is the generated text alone."""
    task = get_task("add:digits=2")
    llm = StubLLM(tokenizer, lambda a, b: 0)
    llm.bare = True
    m = evaluate_task(llm, task, EvalConfig(limit=4, samples=0, think=False))
    assert m["greedy_pass@1"] == 1.0
    assert all(ids[-1] == tokenizer.token_id(ASSISTANT) for ids, _ in llm.requests)
    assert evaluate_task(llm, task, EvalConfig(limit=4, samples=0))["greedy_pass@1"] == 0.0  # unclosed think


def test_evaluate_metrics_on_stub(tokenizer):
    K = 4
    task = get_task("add:digits=2")
    llm = StubLLM(tokenizer, lambda a, b: (a + b) % (K + 1))
    m = evaluate_task(llm, task, EvalConfig(limit=12, samples=K, temperature=0.9, seed=3))
    problems = task.split("test", 12)
    cs = [(p.data["a"] + p.data["b"]) % (K + 1) for p in problems]
    assert EVAL_KEYS | {f"pass@{K}"} == set(m)
    assert m["problems"] == 12 and m["greedy_pass@1"] == 1.0 and m["well_formed"] == 1.0
    assert m["pass@1"] == pytest.approx(sum(c / K for c in cs) / 12)
    assert m[f"pass@{K}"] == pytest.approx(sum(c > 0 for c in cs) / 12)
    assert 0 < m["pass@1"] < m[f"pass@{K}"] < 1
    rewards = [1.0 if j < c else (0.1 if j % 2 else 0.0) for c in cs for j in range(K)]
    assert m["mean_reward"] == pytest.approx(sum(rewards) / len(rewards))
    # one batched call: 12 greedy + 48 sampled requests, distinct seeds, held-out prompts only
    assert len(llm.requests) == 12 * (K + 1)
    seeds = [p.seed for _, p in llm.requests if p.temperature > 0]
    assert len(set(seeds)) == 12 * K
    # greedy only
    m0 = evaluate_task(StubLLM(tokenizer, lambda a, b: 0), task, EvalConfig(limit=5, samples=0))
    assert m0["samples"] == 0 and "pass@1" not in m0 and m0["greedy_pass@1"] == 1.0


def test_distill_keeps_only_verified_samples(tokenizer):
    task = get_task("add:digits=2")
    problems = task.split("train", 6)
    llm = StubLLM(tokenizer, lambda a, b: (a + b) % 3)
    res = rejection_sample(llm, problems, acceptor(task), DistillConfig(samples=4, temperature=0.8))
    expected = sum((p.data["a"] + p.data["b"]) % 3 for p in problems)
    assert res.samples == 24 and res.accepted == expected
    assert res.acceptance_rate == pytest.approx(expected / 24)
    by_prompt = {p.prompt: p for p in problems}
    for r in res.records:
        user, assistant = r["messages"]
        assert user["role"] == "user" and assistant["role"] == "assistant"
        p = by_prompt[user["content"]]
        assert assistant["content"] == f"<think>\n{p.data['a']}+{p.data['b']}\n</think>\n{p.answer}"
        assert task.verify(p, assistant["content"])
    # reasoning required: a correct answer after an empty think block is rejected only then
    bare = StubLLM(tokenizer, lambda a, b: 4, think=False)
    cfg = DistillConfig(samples=2, temperature=0.8)
    assert rejection_sample(bare, problems[:2], acceptor(task), cfg).accepted == 4
    cfg = DistillConfig(samples=2, temperature=0.8, require_think=True)
    assert rejection_sample(bare, problems[:2], acceptor(task), cfg).accepted == 0


@pytest.fixture
def reward_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards_mod.py").write_text(
        textwrap.dedent(
            """
            def exact(problem, response):
                return 1.0 if response.split("</think>")[-1].strip() == problem.answer else 0.0
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_rewards_mod"
    sys.modules.pop("my_rewards_mod", None)


def test_distill_cli_with_stub_teacher(tokenizer, tmp_path, monkeypatch, capsys, reward_module):
    monkeypatch.setattr(distill_mod, "LLM", lambda *a, **kw: StubLLM(tokenizer, lambda a, b: 1))
    out = tmp_path / "d.jsonl"
    args = ["distill", "--teacher", "unused", "--task", "add:digits=2", "--samples", "3", "--limit", "5"]
    assert main([*args, "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary == {"prompts": 5, "samples": 15, "accepted": 5, "acceptance_rate": 5 / 15, "out": str(out)}
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(lines) == 5 and all(set(r) == {"messages"} for r in lines)
    held = {p.prompt for p in get_task("add:digits=2").split("test", 50)}
    assert not held & {r["messages"][0]["content"] for r in lines}  # never the held-out split

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        '{"prompt": "What is 12+30?", "answer": "42"}\n\n{"prompt": "What is 5+6?", "answer": "0"}\n'
    )
    args = ["distill", "--teacher", "x", "--prompts", str(prompts), "--samples", "2", "--out", str(out)]
    assert main([*args, "--reward", f"{reward_module}:exact"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (summary["accepted"], summary["samples"]) == (1, 4)  # 5+6=11 is not the file's answer "0"
    assert json.loads(out.read_text())["messages"][1]["content"] == "<think>\n12+30\n</think>\n42"

    assert main(args) == 2  # --prompts without a verifier
    assert "give --reward" in capsys.readouterr().err
    assert main([*args, "--reward", "nope_mod_xyz:f"]) == 2
    assert "cannot import module" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "x"}\n')
    assert (
        main(
            [
                "distill",
                "--teacher",
                "x",
                "--prompts",
                str(bad),
                "--reward",
                f"{reward_module}:exact",
                "--out",
                str(out),
            ]
        )
        == 2
    )
    assert '"prompt" string' in capsys.readouterr().err


def test_eval_and_distill_cli_on_tiny_model(run_dir, tmp_path, capsys):
    args = ["eval", "--checkpoint", str(run_dir), "--task", "add:digits=2", "--samples", "2"]
    assert main([*args, "--temperature", "0.9", "--limit", "3", "--max-new-tokens", "6"]) == 0
    m = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert EVAL_KEYS | {"pass@2", "checkpoint", "task_spec"} == set(m)
    assert m["problems"] == 3 and m["samples"] == 2 and 1 <= m["mean_response_tokens"] <= 6
    assert 0 <= m["pass@1"] <= m["pass@2"] <= 1

    out = tmp_path / "teacher.jsonl"
    args = ["distill", "--teacher", str(run_dir), "--task", "countdown", "--samples", "2", "--limit", "2"]
    assert main([*args, "--max-new-tokens", "6", "--no-think", "--out", str(out)]) == 0
    s = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert s["prompts"] == 2 and s["samples"] == 4 and s["accepted"] == len(out.read_text().splitlines())
    assert s["acceptance_rate"] == s["accepted"] / 4

    assert main(["eval", "--checkpoint", str(run_dir), "--task", "mul"]) == 2
    assert "unknown task 'mul'" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(run_dir), "--task", "add", "--seed", "-1"]) == 2
    assert "seed must be" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(run_dir), "--task", "add", "--temperature", "0"]) == 2
    assert "temperature > 0" in capsys.readouterr().err
