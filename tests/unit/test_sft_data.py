"""SFT data: TRL's formats load from JSONL files and directories, bad records fail with file, line and field
before anything is tokenized, loss masks follow loss_on, and best-fit-decreasing packing keeps samples apart
(segment ids, positions restarting at 0, no label across a boundary)."""

from __future__ import annotations

import json
from importlib import resources

import numpy as np
import pytest

from dsv3.chat import EOS_TOKEN
from dsv3.tokenizer import Tokenizer
from dsv3.train.sft_data import (
    IGNORE_INDEX,
    PAD_SEGMENT,
    SFTDataError,
    SFTSample,
    _best_fit_decreasing,
    load_sft_data,
    pack,
    read_sft_records,
    stack_rows,
)

CHAT = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Who are you?"},
        {"role": "assistant", "content": "A model."},
    ]
}
PLAIN = {"prompt": "The capital of France is", "completion": " Paris."}
CONV = {
    "prompt": [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},  # a few-shot turn: context, not a target
        {"role": "user", "content": "3+3?"},
    ],
    "completion": [{"role": "assistant", "content": "6"}],
}
TEXT = {"text": "To be, or not to be"}


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    text = (resources.files("dsv3.data") / "tinyshakespeare.txt").read_text()[:30_000]
    return Tokenizer.train([text], 400)


def _write(path, records) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")


def _targets(tok, s: SFTSample) -> str:
    return tok.decode([i for i, m in zip(s.input_ids, s.loss_mask) if m])


def test_formats_and_completion_loss(tok, tmp_path):
    _write(tmp_path / "d" / "a.jsonl", [CHAT, PLAIN, "", CONV])
    _write(tmp_path / "d" / "sub" / "b.jsonl", [TEXT])
    (tmp_path / "d" / "notes.txt").write_text("not data")
    recs = read_sft_records(tmp_path / "d")
    assert [r.kind for r in recs] == [
        "messages",
        "prompt_completion",
        "conversational_prompt_completion",
        "text",
    ]
    assert recs[2].source.endswith("a.jsonl:4") and recs[3].source.endswith("b.jsonl:1")
    chat, plain, conv, text = load_sft_data(tmp_path / "d", tok)
    assert _targets(tok, chat) == f"A model.{EOS_TOKEN}"
    assert tok.decode(chat.input_ids).startswith("<｜begin▁of▁sentence｜>Be brief.<｜User｜>Who are you?")
    assert plain.input_ids[0] == tok.bos_id and plain.input_ids[-1] == tok.eos_id
    assert _targets(tok, plain) == f" Paris.{EOS_TOKEN}"
    assert _targets(tok, conv) == f"6{EOS_TOKEN}"  # the few-shot "4" is not learnt
    assert all(text.loss_mask) and tok.decode(text.input_ids[1:-1]) == TEXT["text"]
    for s in load_sft_data(tmp_path / "d", tok, loss_on="all"):
        assert all(s.loss_mask)
    with pytest.raises(ValueError, match="loss_on"):
        load_sft_data(tmp_path / "d", tok, loss_on="assistant")


BAD = [
    ("{not json", r"bad\.jsonl:2: invalid JSON"),
    ("[1, 2]", r"bad\.jsonl:2: expected a JSON object, got list"),
    ({"foo": 1}, r"bad\.jsonl:2: expected exactly one of 'messages'.*found only \['foo'\]"),
    ({"text": "a", "messages": []}, r"found \['messages', 'text'\]"),
    ({"text": ""}, r"bad\.jsonl:2: text: expected a non-empty string"),
    ({"prompt": "a"}, r"bad\.jsonl:2: completion: missing"),
    ({"prompt": "a", "completion": 3}, r"completion: expected a non-empty string like the prompt, got int"),
    ({"messages": []}, r"messages: expected a non-empty list of messages"),
    ({"messages": [{"role": "bot", "content": "x"}]}, r"messages\[0\]\.role: expected one of"),
    (
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": 5}]},
        r"bad\.jsonl:2: messages\[1\]\.content: expected a string, got int",
    ),
    ({"messages": [{"role": "user", "content": "a"}]}, r"messages: no assistant message"),
    (
        {"messages": [{"role": "assistant", "content": None, "tool_calls": [{"function": {"name": 1}}]}]},
        r"messages\[0\]\.tool_calls\[0\]\.function\.name: expected a string",
    ),
    (
        {"prompt": [{"role": "user", "content": "a"}], "completion": [{"role": "user", "content": "b"}]},
        r"completion: no assistant message",
    ),
    (
        {"prompt": [{"role": "user", "content": "a"}], "completion": "b"},
        r"completion: expected a non-empty list",
    ),
]


@pytest.mark.parametrize(("line", "match"), BAD)
def test_bad_record_names_file_line_and_field(tmp_path, line, match):
    _write(tmp_path / "bad.jsonl", [TEXT, line, TEXT])
    with pytest.raises(SFTDataError, match=match):
        read_sft_records(tmp_path / "bad.jsonl")


def test_errors_come_before_tokenizing(tmp_path):
    _write(tmp_path / "d" / "a.jsonl", [TEXT] * 3)
    _write(tmp_path / "d" / "b.jsonl", [TEXT, {"messages": "hi"}])
    with pytest.raises(SFTDataError, match=r"b\.jsonl:2: messages: expected a non-empty list"):
        load_sft_data(tmp_path / "d", tokenizer=None)  # type: ignore[arg-type]  # never reached
    with pytest.raises(SFTDataError, match="no such file"):
        read_sft_records(tmp_path / "missing.jsonl")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SFTDataError, match="no .jsonl files"):
        read_sft_records(tmp_path / "empty")
    _write(tmp_path / "blank.jsonl", [""])
    with pytest.raises(SFTDataError, match="no records"):
        read_sft_records(tmp_path / "blank.jsonl")


def test_template_failure_names_the_record(tok, tmp_path):
    late_system = {
        "messages": [
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"},
            {"role": "system", "content": "late"},
        ]
    }
    _write(tmp_path / "a.jsonl", [TEXT, late_system])
    with pytest.raises(SFTDataError, match=r"a\.jsonl:2: the chat template is not prefix-stable"):
        load_sft_data(tmp_path / "a.jsonl", tok)


def _sample(n: int, start: int, mask=None) -> SFTSample:
    ids = list(range(start, start + n))
    return SFTSample(ids, list(mask) if mask is not None else [True] * n, f"s{start}")


def test_best_fit_decreasing():
    # longest first; 3 goes to the fullest bin that fits (the 6, room 4), not the first one with room
    assert _best_fit_decreasing([5, 6, 3, 2, 4], 10) == [[1, 4], [0, 2, 3]]
    assert _best_fit_decreasing([10, 10, 1], 10) == [[0], [1], [2]]
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 33, size=300).tolist()
    bins = _best_fit_decreasing(lengths, 32)
    assert sorted(i for b in bins for i in b) == list(range(300))
    assert all(sum(lengths[i] for i in b) <= 32 for b in bins)
    assert len(bins) <= 11 / 9 * (sum(lengths) / 32) + 1  # BFD's bound over the optimum's lower bound


def test_pack_rows():
    a = _sample(5, 100, mask=[False, False, True, True, True])  # prompt 2 tokens, completion 3
    b = _sample(3, 200)
    c = _sample(7, 300)
    rows = pack([a, b, c], seq_len=8, pad_id=7)
    assert len(rows) == 2 and [r.n_samples for r in rows] == [1, 2]
    r0, r1 = rows
    # row 0: c (7 tokens) then one pad
    assert r0.input_ids.tolist() == [300, 301, 302, 303, 304, 305, 306, 7]
    assert r0.labels.tolist() == [301, 302, 303, 304, 305, 306, IGNORE_INDEX, IGNORE_INDEX]
    assert r0.segment_ids.tolist() == [0] * 7 + [PAD_SEGMENT]
    # row 1: a (5) then b (3): positions restart, no label crosses the boundary, a's prompt is masked
    assert r1.input_ids.tolist() == [100, 101, 102, 103, 104, 200, 201, 202]
    assert r1.positions.tolist() == [0, 1, 2, 3, 4, 0, 1, 2]
    assert r1.segment_ids.tolist() == [0, 0, 0, 0, 0, 1, 1, 1]
    assert r1.labels.tolist() == [IGNORE_INDEX, 102, 103, 104, IGNORE_INDEX, 201, 202, IGNORE_INDEX]
    batch = stack_rows(rows)
    assert {k: v.shape for k, v in batch.items()} == {k: (2, 8) for k in batch}
    assert all(v.dtype == np.int64 for v in batch.values())


def test_pack_truncates_long_samples_with_a_warning():
    with pytest.warns(UserWarning, match="1 of 2 SFT samples are longer than seq_len=4"):
        rows = pack([_sample(6, 0), _sample(2, 50)], seq_len=4)
    assert [r.input_ids.tolist() for r in rows] == [[0, 1, 2, 3], [50, 51, 0, 0]]
    assert rows[0].labels.tolist() == [1, 2, 3, IGNORE_INDEX]
    with pytest.raises(ValueError, match="seq_len"):
        pack([_sample(2, 0)], seq_len=1)


def test_packed_chat_samples_keep_their_targets(tok, tmp_path):
    _write(tmp_path / "a.jsonl", [CHAT, PLAIN, CONV, TEXT] * 3)
    samples = load_sft_data(tmp_path / "a.jsonl", tok)
    rows = pack(samples, seq_len=64, pad_id=tok.pad_id)
    assert sum(r.n_samples for r in rows) == len(samples)
    targets = sorted(i for r in rows for i in r.labels.tolist() if i != IGNORE_INDEX)
    expected = sorted(i for s in samples for i, m in zip(s.input_ids[1:], s.loss_mask[1:]) if m)
    assert targets == expected


def test_last_assistant_turn_keeps_its_reasoning():
    """DeepSeek's template drops <think> reasoning from assistant turns; the turn a sample teaches keeps
    it, tokenized as the generation prompt (which opens <think>) + the turn: what generation sees."""
    from dsv3.chat import encode_chat
    from dsv3.tokenizer import Tokenizer
    from dsv3.train.sft_data import SFTRecord, tokenize_record

    tok = Tokenizer.train(["What is 2+3? reasoning 5 answer carry write"] * 4, 400)
    msgs = [
        {"role": "user", "content": "What is 2+3?"},
        {"role": "assistant", "content": "<think>\n2+3=5 write 5\n</think>\n5"},
    ]
    s = tokenize_record(tok, SFTRecord("t.jsonl:1", "messages", {"messages": msgs}))
    prompt, _ = encode_chat(tok, msgs[:1], add_generation_prompt=True)
    assert s.input_ids[: len(prompt)] == prompt and not any(s.loss_mask[: len(prompt)])
    learned = tok.decode([i for i, m in zip(s.input_ids, s.loss_mask) if m])
    assert learned == "2+3=5 write 5\n</think>\n5" + tok.eos_token
    bare = [msgs[0], {"role": "assistant", "content": "5"}]  # no reasoning: the template as it is
    b = tokenize_record(tok, SFTRecord("t.jsonl:2", "messages", {"messages": bare}))
    assert b.input_ids == encode_chat(tok, bare)[0]
