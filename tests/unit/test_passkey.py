"""The passkey (needle) task: prompts of the asked length with the key at the asked depth, held-out split,
verifier and reward, token budgets, and the length x depth sweep through a stub and a real engine."""

from __future__ import annotations

import re
from importlib import resources

import pytest
import torch

from dsv3 import ModelConfig, Transformer
from dsv3.inference import LLM, RequestOutput
from dsv3.tasks import get_task
from dsv3.tasks.passkey import QUESTION, PasskeyTask, chars_for_tokens, main, passkey_sweep
from dsv3.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    text = (resources.files("dsv3.data") / "tinyshakespeare.txt").read_text()[:20000]
    filler = PasskeyTask(length=3000).problem("12345").prompt
    return Tokenizer.train([text, filler], ModelConfig.from_preset("debug").vocab_size)


def test_prompt_length_depth_and_answer():
    for length in (200, 1000, 5000):
        for depth in (0.0, 0.3, 1.0):
            t = get_task(f"passkey:length={length},depth={depth}")
            assert isinstance(t, PasskeyTask)
            p = t.problem("48213")
            assert len(p.prompt) <= length and len(p.prompt) > length - 30  # whole sentences up to it
            assert p.prompt.endswith(QUESTION) and p.answer == "48213"
            at = p.prompt.index("The pass key is 48213")
            frac = at / (len(p.prompt) - len(QUESTION))
            assert abs(frac - depth) < 0.1 + 200 / length
    assert PasskeyTask(length=300, depth=0.0).problem("7").prompt.startswith("The pass key is 7.")


def test_split_is_fixed_and_keys_random():
    t = PasskeyTask(length=400, depth=0.5)
    test = t.split("test", 20)
    assert [p.key for p in test] == [p.key for p in PasskeyTask(length=400, depth=0.5).split("test", 20)]
    assert len({p.data["key"] for p in test}) == 20 and all(len(p.data["key"]) == 5 for p in test)
    train = {p.key for p in t.split("train", 200)}
    assert not train & {p.key for p in test}


def test_verifier_and_reward():
    t = PasskeyTask(length=300)
    p = t.problem("48213")
    assert t.verify(p, " 48213. The grass is green.") and t.reward(p, "48213") == 1.0
    assert not t.verify(p, "48214") and t.reward(p, "48214.") == 0.1
    assert t.reward(p, "the key is 48213") == 0.0 and not t.well_formed("no idea")
    assert t.verify(p, "<think>\nit was early\n</think>\n48213")


def test_settings_are_checked():
    with pytest.raises(ValueError, match="depth"):
        PasskeyTask(depth=1.5)
    with pytest.raises(ValueError, match="length"):
        PasskeyTask(length=20)
    with pytest.raises(ValueError, match="digits"):
        get_task("passkey:digits=0")


def test_chars_for_tokens_fits_the_budget(tokenizer):
    for tokens in (128, 256):
        chars = chars_for_tokens(tokenizer, tokens)
        for depth in (0.0, 0.5, 1.0):
            ids, _ = tokenizer.encode_with_offsets(PasskeyTask(chars, depth).problem("31415").prompt)
            assert tokens * 0.8 <= len(ids) <= tokens


class Oracle:
    """Reads the key out of the prompt when the needle sits in its last `window` characters, else
    answers a wrong key: a model with a fixed attention span."""

    def __init__(self, tokenizer, window: int):
        self.tokenizer, self.window = tokenizer, window

    def generate(self, prompts, params):
        outs = []
        for text in prompts:
            m = re.search(r"The pass key is (\d+)", text[-self.window :])
            answer = f" {m.group(1)}. The" if m else " 11111."
            outs.append(RequestOutput("0", text, [], [], answer, True, "stop"))
        return outs


def test_sweep_scores_each_cell(tokenizer):
    grid = passkey_sweep(Oracle(tokenizer, window=10_000), [128, 256], [0.0, 1.0], n=4)
    assert [(r["length"], r["depth"], r["n"]) for r in grid] == [
        (128, 0.0, 4),
        (128, 1.0, 4),
        (256, 0.0, 4),
        (256, 1.0, 4),
    ]
    assert all(r["accuracy"] == 1.0 for r in grid)
    near = passkey_sweep(Oracle(tokenizer, window=200), [256], [0.0, 1.0], n=4)
    assert [r["accuracy"] for r in near] == [0.0, 1.0]  # the far needle is missed


def test_sweep_runs_a_real_model(tokenizer, tmp_path, capsys):
    from dsv3.checkpoint import save_pretrained

    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("debug"))
    llm = LLM(model, tokenizer=tokenizer, max_seq_len=160, dtype="float32")
    grid = passkey_sweep(llm, [128], [0.5], n=2)
    assert grid[0]["n"] == 2 and 0.0 <= grid[0]["accuracy"] <= 1.0
    save_pretrained(model, tmp_path / "m", dtype=torch.float32, tokenizer=tokenizer)
    assert main(["--checkpoint", str(tmp_path / "m"), "--lengths", "96", "--depths", "0,1", "--n", "2"]) == 0
    assert capsys.readouterr().out.count('"accuracy"') == 2
