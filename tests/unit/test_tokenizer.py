"""Byte-level BPE tokenizer: arbitrary bytes round-trip, specials are never injected by text, and the saved
tokenizer.json loads in transformers with the same ids."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsv3.tokenizer import BOS, EOS, FIM_BEGIN, FIM_END, FIM_HOLE, MIN_VOCAB, PAD, SPECIAL_TOKENS, Tokenizer
from dsv3.train.data import bundled_corpus_path


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    text = bundled_corpus_path().read_text()[:60_000]
    return Tokenizer.train([text], 400)


def test_vocab_specials_and_merges(tok):
    assert tok.vocab_size == 400
    assert [tok.token_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert tok.bos_id == 0 and tok.eos_id == 1
    assert tok.fim_ids == (tok.token_id(FIM_BEGIN), tok.token_id(FIM_HOLE), tok.token_id(FIM_END))
    ids = tok.encode("First Citizen: the king")
    assert len(ids) < len("First Citizen: the king")  # merges were learned
    assert tok.decode(ids) == "First Citizen: the king"


def test_special_token_text_is_not_injected(tok):
    text = f"a {BOS} b {EOS}"
    ids = tok.encode(text)
    assert tok.bos_id not in ids and tok.eos_id not in ids
    assert tok.decode(ids) == text


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64))
def test_arbitrary_bytes_round_trip(tok, data):
    ids = tok.encode_bytes(data)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode_bytes(ids) == data


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=64))
def test_text_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_invalid_utf8_bytes_become_byte_tokens(tok):
    data = b"ok \xff\xc3 then"
    ids = tok.encode_bytes(data)
    assert tok.decode_bytes(ids) == data
    assert tok.decode(ids) == "ok \ufffd\ufffd then"


def test_token_byte_lengths(tok):
    ids = tok.encode("Hello, world")
    assert sum(tok.token_byte_lengths[i] for i in ids) == len(b"Hello, world")
    assert tok.token_byte_lengths[tok.bos_id] == 0


def test_save_load_and_transformers(tok, tmp_path):
    tok.save(tmp_path)
    again = Tokenizer.from_file(tmp_path)
    text = "ROMEO:\nBut, soft! what light through yonder window breaks?"
    assert again.encode(text) == tok.encode(text)
    transformers = pytest.importorskip("transformers")
    hf = transformers.PreTrainedTokenizerFast.from_pretrained(str(tmp_path))
    assert hf.encode(text, add_special_tokens=False) == tok.encode(text)
    assert hf.decode(tok.encode(text)) == text
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (tok.bos_id, tok.eos_id, tok.pad_id)


def test_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="vocab_size"):
        Tokenizer.train(["abc"], MIN_VOCAB - 1)
    with pytest.raises(ValueError, match="no tokenizer.json"):
        Tokenizer.from_file(tmp_path)


def test_deepseek_specials_reserved_and_never_merged():
    from dsv3.chat import CHAT_TOKENS

    # a corpus full of the specials' text: merges must still never produce one
    text = bundled_corpus_path().read_text()[:20_000] + " <think> </think> <｜User｜> <｜Assistant｜>" * 300
    t = Tokenizer.train([text], 400)
    assert SPECIAL_TOKENS[:3] == (BOS, EOS, PAD)
    assert (BOS, EOS, PAD) == ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>")
    assert set(CHAT_TOKENS) <= set(SPECIAL_TOKENS)
    special_ids = {t.token_id(s) for s in SPECIAL_TOKENS}
    assert special_ids == set(range(len(SPECIAL_TOKENS)))
    for s in SPECIAL_TOKENS:
        ids = t.encode(s)
        assert len(ids) > 1 and not special_ids & set(ids)
        assert t.decode(ids) == s
        assert t.encode_with_offsets(f"a{s}b")[0][1] == t.token_id(s)


def _legacy_tokenizer(directory, with_config: bool) -> None:
    """A tokenizer directory as dsv3 wrote it before the DeepSeek-V3 tokens (`<|begin_of_text|>`...)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from dsv3.tokenizer import LEGACY_SPECIAL_TOKENS

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=list(LEGACY_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train_from_iterator([bundled_corpus_path().read_text()[:20_000]], trainer=trainer)
    directory.mkdir(parents=True, exist_ok=True)
    hf.save(str(directory / "tokenizer.json"))
    if with_config:
        bos, eos, pad, *fim = LEGACY_SPECIAL_TOKENS
        cfg = {"bos_token": bos, "eos_token": eos, "pad_token": pad, "additional_special_tokens": fim}
        (directory / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "X", **cfg}))
        (directory / "special_tokens_map.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("with_config", [True, False])
def test_legacy_run_directories_still_load(tmp_path, with_config):
    _legacy_tokenizer(tmp_path / "run" / "model", with_config)
    old = Tokenizer.from_file(tmp_path / "run")  # a run dir: RUN/model/tokenizer.json
    assert (old.bos_token, old.eos_token, old.pad_token) == (
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|pad|>",
    )
    assert (old.bos_id, old.eos_id, old.pad_id, old.fim_ids) == (0, 1, 2, (3, 4, 5))
    assert old.decode(old.encode("to be or not")) == "to be or not"
    assert old.token_byte_lengths[old.bos_id] == 0
    # a re-export keeps its tokens and now carries the chat template
    old.save(tmp_path / "export")
    again = Tokenizer.from_file(tmp_path / "export")
    assert (again.bos_id, again.eos_id, again.fim_ids) == (0, 1, (3, 4, 5))
    assert "chat_template" in json.loads((tmp_path / "export" / "tokenizer_config.json").read_text())


def test_any_fast_tokenizer_with_its_own_specials(tok, tmp_path):
    """Special tokens come from the directory's files, not from names hard-coded in dsv3; FIM is optional."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers

    vocab = {c: i for i, c in enumerate(["<s>", "</s>", "<unk>", "a", "b", "ab"])}
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=[("a", "b")], unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.add_special_tokens(["<s>", "</s>", "<unk>"])
    hf.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": {"content": "<s>", "special": True}, "eos_token": "</s>"})
    )
    template = "{{ messages[0]['content'] }}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    t = Tokenizer.from_file(tmp_path)
    assert (t.bos_id, t.eos_id, t.pad_id) == (0, 1, None)
    assert t.chat_template == template
    assert t.encode("ab") == [5]
    with pytest.raises(ValueError, match="fill-in-the-middle"):
        _ = t.fim_ids
    (tmp_path / "chat_template.jinja").write_text("{{ bos_token }}")  # transformers 5 writes this file
    assert Tokenizer.from_file(tmp_path).chat_template == "{{ bos_token }}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<nope>"}))
    with pytest.raises(ValueError, match="bos_token '<nope>' is not in the tokenizer's vocabulary"):
        Tokenizer.from_file(tmp_path)


def test_split_digits_spells_numbers_digit_by_digit(tmp_path):
    """split_digits: no merge spans two digits, text round-trips, and transformers reads the same split."""
    from transformers import PreTrainedTokenizerFast

    texts = ["The pass key is 48213. Remember it. 48213 is the pass key. In 1999, 2024 and 31415."] * 40
    merged = Tokenizer.train(texts, MIN_VOCAB + 64)
    split = Tokenizer.train(texts, MIN_VOCAB + 64, split_digits=True)
    s = "key is 78412 and 48213."
    assert any(sum(c.isdigit() for c in merged.decode([i])) > 1 for i in merged.encode(s))
    pieces = [split.decode([i]) for i in split.encode(s)]
    assert all(sum(c.isdigit() for c in p) <= 1 for p in pieces) and split.decode(split.encode(s)) == s
    split.save(tmp_path)
    hf = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    assert hf.encode(s, add_special_tokens=False) == Tokenizer.from_file(tmp_path).encode(s)
