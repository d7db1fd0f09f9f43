"""lm-evaluation-harness on a tiny dsv3 model: in process (`dsv3 eval --tasks`) and, as its users run it,
the `lm_eval` command against a live `dsv3 serve` (local-completions, local-chat-completions). Both see the
same model and the same local tasks (tests/data/lm_eval_tasks: JSONL files, nothing downloaded), so the
accuracies must be equal, and so must every document's log-likelihoods (1e-4) and generated texts."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path

import httpx
import pytest
import torch

pytest.importorskip("lm_eval")

from dsv3 import ModelConfig, Transformer  # noqa: E402
from dsv3.chat import render  # noqa: E402
from dsv3.checkpoint import save_pretrained  # noqa: E402
from dsv3.cli import main  # noqa: E402
from dsv3.tokenizer import Tokenizer  # noqa: E402

TASKS_DIR = Path(__file__).resolve().parents[1] / "data" / "lm_eval_tasks"
TASKS = "dsv3_tiny_mc,dsv3_tiny_gen"
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
NAME = "dsv3-tiny"


def task_texts() -> list[str]:
    """The tasks' documents with their answers, as the prompts lm_eval builds show them (the generation
    task also through the chat template, as local-chat-completions and --apply-chat-template send it)."""
    out = []
    for line in (TASKS_DIR / "gen.jsonl").read_text().splitlines():
        d = json.loads(line)
        out.append(f"Q: {d['question']}\nA: {d['answer']}\n")
        chat = render([{"role": "user", "content": f"Q: {d['question']}\nA:"}], add_generation_prompt=True)
        out.append(f"{chat}{d['answer']}\n")
    for line in (TASKS_DIR / "mc.jsonl").read_text().splitlines():
        d = json.loads(line)
        out.append(f"Question: {d['question']}\nAnswer: {d['choices'][d['answer']]}")
    return out


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A debug-preset model trained 100 full-batch steps on the task documents (~2 s): accuracies well
    above chance, so the in-process / server comparison is not a comparison of zeros."""
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("debug")
    texts = task_texts()
    shakespeare = (resources.files("dsv3.data") / "tinyshakespeare.txt").read_text()[:60000]
    tok = Tokenizer.train([shakespeare, *texts * 20], cfg.vocab_size)
    model = Transformer(cfg)
    ids = [tok.encode_with_offsets(t)[0] + [tok.eos_id] for t in texts]  # chat tokens parsed
    T = max(map(len, ids))
    x = torch.zeros(len(ids), T, dtype=torch.long)
    labels = torch.full((len(ids), T), -100)
    for i, s in enumerate(ids):
        x[i, : len(s)] = torch.tensor(s)
        labels[i, : len(s) - 1] = torch.tensor(s[1:])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(100):
        logits = model(x, with_mtp=False).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()
    run = tmp_path_factory.mktemp("run")
    save_pretrained(model, run / "model", dtype=torch.float32, tokenizer=tok)
    return run


def dsv3_eval(run: Path, out: Path, tasks: str, *extra: str) -> dict:
    """`dsv3 eval --tasks` in this process; its --output JSON."""
    mp = pytest.MonkeyPatch()
    for k, v in OFFLINE.items():
        mp.setenv(k, v)
    try:
        argv = ["eval", "--checkpoint", str(run), "--tasks", tasks, "--include-path", str(TASKS_DIR)]
        assert main([*argv, "--output", str(out), *extra]) == 0
    finally:
        mp.undo()
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def in_process(run_dir, tmp_path_factory) -> dict:
    return dsv3_eval(run_dir, tmp_path_factory.mktemp("inproc") / "results.json", TASKS)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(run_dir):
    """`dsv3 serve` on the same model, in its own process."""
    port = _free_port()
    cmd = [sys.executable, "-m", "dsv3.cli", "serve", "--model", str(run_dir), "--port", str(port)]
    cmd += ["--served-model-name", NAME, "--dtype", "fp32", "--max-batch-size", "8"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and p.poll() is None:
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        assert p.poll() is None, p.communicate()[0]
        yield base
    finally:
        p.terminate()
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()


def lm_eval_cli(model: str, model_args: str, tasks: str, out: Path, *extra: str) -> tuple[dict, dict]:
    """The `lm_eval` command as its users run it; (results, {task: [sample, ...]}) from --output_path."""
    exe = Path(sys.executable).with_name("lm_eval")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "lm_eval"]
    cmd += ["--model", model, "--model_args", model_args, "--tasks", tasks, "--include_path", str(TASKS_DIR)]
    cmd += ["--output_path", str(out), "--log_samples", *extra]
    r = subprocess.run(cmd, env={**os.environ, **OFFLINE}, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    (results_file,) = out.rglob("results_*.json")
    samples = {}
    for task in tasks.split(","):
        (f,) = out.rglob(f"samples_{task}_*.jsonl")
        samples[task] = [json.loads(line) for line in f.read_text().splitlines()]
    return json.loads(results_file.read_text())["results"], samples


def by_doc(samples: list[dict]) -> dict[int, dict]:
    return {s["doc_id"]: s for s in samples}


def test_in_process_eval_completes_on_both_tasks(in_process):
    tasks = in_process["tasks"]
    assert tasks["dsv3_tiny_mc"]["acc,none"] > 0.5  # 4 choices: chance is 0.25
    assert tasks["dsv3_tiny_gen"]["exact_match,strip"] > 0.5
    samples = in_process["lm_eval"]["samples"]
    assert len(samples["dsv3_tiny_mc"]) == 12 and len(samples["dsv3_tiny_gen"]) == 12


def test_lm_eval_local_completions_against_dsv3_serve(run_dir, in_process, server, tmp_path):
    args = f"model={NAME},base_url={server}/v1/completions,tokenizer_backend=huggingface,"
    args += f"tokenizer={run_dir / 'model'},max_retries=1"
    results, samples = lm_eval_cli("local-completions", args, TASKS, tmp_path)
    ours = in_process["tasks"]
    assert results["dsv3_tiny_mc"]["acc,none"] == ours["dsv3_tiny_mc"]["acc,none"]
    assert results["dsv3_tiny_gen"]["exact_match,strip"] == ours["dsv3_tiny_gen"]["exact_match,strip"]
    mine = {t: by_doc(s) for t, s in in_process["lm_eval"]["samples"].items()}
    for doc_id, s in by_doc(samples["dsv3_tiny_mc"]).items():
        theirs = [float(r[0][0]) for r in s["resps"]]
        ours_ll = [float(r[0][0]) for r in mine["dsv3_tiny_mc"][doc_id]["resps"]]
        assert max(abs(a - b) for a, b in zip(theirs, ours_ll)) <= 1e-4, (doc_id, theirs, ours_ll)
    for doc_id, s in by_doc(samples["dsv3_tiny_gen"]).items():
        assert s["resps"] == mine["dsv3_tiny_gen"][doc_id]["resps"], doc_id


def test_lm_eval_local_chat_completions_against_dsv3_serve(run_dir, server, tmp_path):
    """Generation through /v1/chat/completions (the server renders the chat template) equals the
    in-process adapter with --apply-chat-template (the same template, rendered by the adapter)."""
    ours = dsv3_eval(run_dir, tmp_path / "chat.json", "dsv3_tiny_gen", "--apply-chat-template")
    args = f"model={NAME},base_url={server}/v1/chat/completions,max_retries=1"
    results, samples = lm_eval_cli(
        "local-chat-completions", args, "dsv3_tiny_gen", tmp_path / "lm_eval", "--apply_chat_template"
    )
    acc = ours["tasks"]["dsv3_tiny_gen"]["exact_match,strip"]
    assert acc > 0.5  # the model answers through the chat template too: not a comparison of empty strings
    assert results["dsv3_tiny_gen"]["exact_match,strip"] == acc
    mine = by_doc(ours["lm_eval"]["samples"]["dsv3_tiny_gen"])
    for doc_id, s in by_doc(samples["dsv3_tiny_gen"]).items():
        assert s["resps"] == mine[doc_id]["resps"], doc_id
