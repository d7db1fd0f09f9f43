"""Byte-level BPE tokenizer: arbitrary bytes round-trip, specials are never injected by text, and the saved
tokenizer.json loads in transformers with the same ids."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsv3.tokenizer import BOS, EOS, FIM_BEGIN, FIM_END, FIM_HOLE, MIN_VOCAB, SPECIAL_TOKENS, Tokenizer
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
