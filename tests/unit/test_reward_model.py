"""The reward model: Bradley-Terry loss on fixed scores, last-token (or answer-token) pooling under padding,
preference-record validation (file, line, field, before training), a save/load round trip that scores
identically, the `load_reward_model` callable contract GRPO relies on, and the add-task preference pairs."""

from __future__ import annotations

import json
import math
import random
from importlib import resources

import pytest
import torch

from dsv3.config import ModelConfig
from dsv3.model import Transformer
from dsv3.rl.reward_model import (
    HEAD_FILE,
    RewardModel,
    RewardScorer,
    add_preference_pairs,
    bradley_terry_loss,
    collate,
    corrupt_sum,
    encode_response,
    load_reward_model,
    load_reward_model_module,
    pool_last,
    save_reward_model,
)
from dsv3.rl.rm_cli import PreferenceDataError, RMConfig, read_preferences, split_records
from dsv3.tasks import get_task
from dsv3.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    text = (resources.files("dsv3.data") / "tinyshakespeare.txt").read_text()[:20_000]
    return Tokenizer.train([text + " 0123456789+?"], 300)


@pytest.fixture(scope="module")
def rm() -> RewardModel:
    torch.manual_seed(0)
    return RewardModel(Transformer(ModelConfig.from_preset("debug"))).eval()


def test_bradley_terry_loss_on_fixed_scores():
    chosen, rejected = torch.tensor([2.0, 0.0, -1.0]), torch.tensor([1.0, 0.0, 1.0])
    loss, stats = bradley_terry_loss(chosen, rejected)
    want = sum(-math.log(1 / (1 + math.exp(-d))) for d in (1.0, 0.0, -2.0)) / 3
    assert loss.item() == pytest.approx(want, abs=1e-6)
    assert stats["accuracy"] == pytest.approx(1 / 3)  # a tie is not a win
    assert stats["margin"] == pytest.approx(-1 / 3)
    centred, _ = bradley_terry_loss(chosen, rejected, center_rewards_coefficient=0.01)
    assert centred.item() == pytest.approx(want + 0.01 * (9 + 0 + 0) / 3, abs=1e-6)  # (r+ + r-)^2
    # the gradient pushes chosen up and rejected down
    c, r = chosen.clone().requires_grad_(), rejected.clone().requires_grad_()
    bradley_terry_loss(c, r)[0].backward()
    assert (c.grad < 0).all() and (r.grad > 0).all()
    with pytest.raises(ValueError, match=r"\[N\]"):
        bradley_terry_loss(chosen, rejected[:2])


def test_pool_last_picks_the_last_real_token():
    hidden = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(pool_last(hidden, mask), torch.stack([hidden[0, 1], hidden[1, 3]]))
    with pytest.raises(ValueError, match="at least one"):
        pool_last(hidden, torch.zeros(2, 4, dtype=torch.bool))


def test_answer_pooling_reads_the_token_before_the_last(rm, tmp_path, tok):
    """pool="answer": the head reads the response's last token (before the EOS); padding changes nothing,
    the setting survives save/load, a bad value is refused."""
    hidden = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(pool_last(hidden, mask, 1), torch.stack([hidden[0, 1], hidden[1, 0]]))  # clamped
    ans = RewardModel(rm.backbone, pool="answer").eval()
    ans.score.load_state_dict(rm.score.state_dict())
    seqs = [[5, 9, 17, 3], [5, 8, 2], [5, 7, 7, 7, 7, 7, 2]]
    want = torch.cat([rm(*collate([s[:-1]])) for s in seqs])  # "eos" pooling without the last token
    torch.testing.assert_close(ans(*collate(seqs, pad_id=1)), want, atol=1e-5, rtol=1e-5)
    save_reward_model(ans, tok, tmp_path / "a")
    model, _, meta = load_reward_model_module(tmp_path / "a")
    assert meta["pool"] == model.pool == "answer"
    with pytest.raises(ValueError, match="pool"):
        RewardModel(rm.backbone, pool="mean")
    with pytest.raises(ValueError, match="pool"):
        RMConfig().with_overrides(["pool=first"])


def test_padded_sequences_score_as_they_do_alone(rm):
    seqs = [[5, 9, 17, 3], [5, 8], [5, 7, 7, 7, 7, 7, 2]]
    alone = torch.cat([rm(*collate([s])) for s in seqs])
    ids, mask = collate(seqs, pad_id=1)
    assert ids.shape == (3, 7) and mask.sum(1).tolist() == [4, 2, 7]
    batched = rm(ids, mask)
    assert batched.shape == (3,) and batched.dtype == torch.float32
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)
    assert rm.score_ids(seqs, batch_size=2) == pytest.approx(alone.tolist(), abs=1e-5)
    assert len(set(round(x, 6) for x in alone.tolist())) == 3  # the scores do depend on the tokens


def test_encode_response_format(tok):
    plain = encode_response(tok, "What is 2+3?", "5", 512)
    msgs = encode_response(tok, [{"role": "user", "content": "What is 2+3?"}], "5", 512)
    conv = encode_response(tok, "What is 2+3?", [{"role": "assistant", "content": "5"}], 512)
    assert plain == msgs == conv and plain[-1] == tok.eos_id
    assert tok.decode(plain).endswith("<｜Assistant｜><think>\n5<｜end▁of▁sentence｜>")
    # GRPO puts the generation prompt's `<think>\n` back in front of completions: not read twice
    assert encode_response(tok, "What is 2+3?", "<think>\n5", 512) == plain
    assert encode_response(tok, "What is 2+3?", "5", 4) == plain[-4:]  # long inputs keep their end
    with pytest.raises(ValueError, match="assistant message"):
        encode_response(tok, "q", [{"role": "user", "content": "5"}], 512)


BAD = [
    ('{"prompt": "p", "chosen": "a"}', r":2: rejected: missing"),
    ('{"prompt": "p", "chosen": 3, "rejected": "b"}', r":2: chosen: expected a string or a non-empty list"),
    (
        '{"prompt": [{"role": "user", "content": 1}], "chosen": "a", "rejected": "b"}',
        r":2: prompt\[0\].content",
    ),
    (
        '{"prompt": "p", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"}',
        r":2: chosen: .*assistant",
    ),
    ('{"prompt": "p", "chosen": "a", "rejected": "a"}', r":2: chosen and rejected are identical"),
    ('{"prompt": "", "chosen": "a", "rejected": "b"}', r":2: prompt: empty"),
    ("[1, 2]", r":2: expected a JSON object"),
    ('{"prompt": "p",', r":2: invalid JSON"),
]


@pytest.mark.parametrize("line,match", BAD)
def test_bad_records_name_file_line_and_field(tmp_path, line, match):
    path = tmp_path / "prefs.jsonl"
    path.write_text('{"prompt": "What is 1+1?", "chosen": "2", "rejected": "3"}\n' + line + "\n")
    with pytest.raises(PreferenceDataError, match=f"prefs.jsonl{match}"):
        read_preferences(path)


def test_good_records_and_split(tmp_path):
    path = tmp_path / "prefs.jsonl"
    recs = [{"prompt": f"What is {i}+1?", "chosen": str(i + 1), "rejected": str(i + 2)} for i in range(20)]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs) + "\n")
    got = read_preferences(path)
    assert len(got) == 20 and got[3]["source"].endswith("prefs.jsonl:4")
    train, held = split_records(got, 0.1, seed=0)
    assert len(train) == 18 and len(held) == 2
    assert {r["source"] for r in train}.isdisjoint(r["source"] for r in held)
    assert split_records(got, 0.1, seed=0) == (train, held)  # seeded
    with pytest.raises(ValueError, match="at least 2"):
        split_records(got[:1], 0.1, seed=0)


def test_rm_config_overrides():
    cfg = RMConfig().with_overrides(["lr=3e-3", "batch_size=8", "center_rewards_coefficient=0.01"])
    assert (cfg.lr, cfg.batch_size, cfg.center_rewards_coefficient) == (3e-3, 8, 0.01)
    with pytest.raises(ValueError, match="unknown setting"):
        RMConfig().with_overrides(["learning_rate=1"])
    with pytest.raises(ValueError, match="batch_size"):
        RMConfig().with_overrides(["batch_size=0"])


def test_save_load_round_trip_scores_the_same(rm, tok, tmp_path):
    with torch.no_grad():
        rm.score.weight.normal_()
    prompts = ["What is 12+30?", [{"role": "user", "content": "What is 7+8?"}], "What is 1+1?"]
    completions = ["42", "<think>\n7+8+0=15\n</think>\n15", [{"role": "assistant", "content": "3"}]]
    before = RewardScorer(rm, tok, max_length=64)(prompts, completions, [[1]] * 3)
    save_reward_model(rm, tok, tmp_path / "run")
    assert {p.name for p in (tmp_path / "run").iterdir()} >= {"model", HEAD_FILE, "reward_model.json"}
    scorer = load_reward_model(tmp_path / "run")
    after = scorer(prompts, completions, [[1]] * 3, answer=["42", "15", "2"])  # extra columns are accepted
    assert after == before  # float32 on disk: bit for bit
    # the contract GRPO relies on: one float per completion, in order
    assert isinstance(after, list) and len(after) == 3 and all(type(x) is float for x in after)
    assert scorer([prompts[0]], [completions[0]], [[1]]) == [before[0]]
    with pytest.raises(ValueError, match="2 prompts for 3 completions"):
        scorer(prompts[:2], completions, [[1]] * 3)
    model, _, meta = load_reward_model_module(tmp_path / "run")
    assert meta["max_length"] == rm.max_length and not model.training
    (tmp_path / "run" / HEAD_FILE).write_bytes((tmp_path / "run" / HEAD_FILE).read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(ValueError, match="checksum"):
        load_reward_model(tmp_path / "run")
    with pytest.raises(ValueError, match="not a reward model run directory"):
        load_reward_model(tmp_path)


def test_add_preference_pairs():
    rng = random.Random(0)
    for a, b in [(47, 85), (10, 10), (99, 99), (0, 0), (5, 7)]:
        for _ in range(20):
            wrong = corrupt_sum(a, b, rng)
            assert wrong != a + b and wrong >= 0
    train, test = add_preference_pairs(100, 2, "train"), add_preference_pairs(30, 2, "test")
    assert len(train) == 100 and len(test) == 30
    assert {r["prompt"] for r in train}.isdisjoint(r["prompt"] for r in test)  # held-out problems
    task = get_task("add:digits=2")
    for r in train + test:
        a, b = map(int, r["prompt"].removeprefix("What is ").removesuffix("?").split("+"))
        assert int(r["chosen"]) == a + b != int(r["rejected"])
        assert task.split_of(task.problem(a, b)) == ("test" if r in test else "train")
    assert add_preference_pairs(30, 2, "test") == test  # the same pairs on every call
