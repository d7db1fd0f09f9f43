"""Byte-level BPE tokenizer (the `tokenizers` library), saved as a tokenizer.json transformers loads.

Every byte is a base token (GPT-2's byte-to-unicode alphabet), so any text has an encoding, and merges
learned from the corpus sit on top. Special tokens come first (ids 0..5): BOS, EOS, PAD and the three
Fill-in-the-Middle markers used in PSM form (`<|fim_begin|>prefix<|fim_hole|>suffix<|fim_end|>middle`).

`encode(text)` never turns literal special-token text inside `text` into special ids (data cannot inject
control tokens). `encode_bytes`/`decode_bytes` round-trip arbitrary bytes, invalid UTF-8 included: valid
UTF-8 runs go through BPE, each invalid byte becomes its single-byte token.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from functools import cached_property
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

BOS = "<|begin_of_text|>"
EOS = "<|end_of_text|>"
PAD = "<|pad|>"
FIM_BEGIN = "<|fim_begin|>"
FIM_HOLE = "<|fim_hole|>"
FIM_END = "<|fim_end|>"
SPECIAL_TOKENS = (BOS, EOS, PAD, FIM_BEGIN, FIM_HOLE, FIM_END)
MIN_VOCAB = 256 + len(SPECIAL_TOKENS)

_ESCAPED = re.compile("[\udc80-\udcff]")  # bytes that were not valid UTF-8, after surrogateescape


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (the ByteLevel alphabet)."""
    bs = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    )
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


class Tokenizer:
    """Wraps a `tokenizers.Tokenizer` (byte-level BPE) with byte-exact helpers."""

    def __init__(self, tok: HFTokenizer):
        self._tok = tok
        self._tok.encode_special_tokens = True  # literal "<|...|>" in text stays text
        missing = [t for t in SPECIAL_TOKENS if tok.token_to_id(t) is None]
        if missing:
            raise ValueError(f"tokenizer lacks the special tokens {missing}")

    # ------------------------------------------------------------ build / load / save
    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> Tokenizer:
        """Learn byte-level BPE merges from `texts` up to `vocab_size` tokens (specials and bytes count)."""
        if not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB:
            raise ValueError(
                f"vocab_size must be an integer >= {MIN_VOCAB} (256 bytes + specials), got {vocab_size!r}"
            )
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=2,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        """Load tokenizer.json, or the tokenizer.json inside a directory (an HF model dir or a run dir)."""
        p = Path(path)
        if p.is_dir():
            for cand in (p / "tokenizer.json", p / "model" / "tokenizer.json"):
                if cand.is_file():
                    p = cand
                    break
            else:
                raise ValueError(f"no tokenizer.json in {path}")
        if not p.is_file():
            raise ValueError(f"tokenizer file not found: {path}")
        return cls(HFTokenizer.from_file(str(p)))

    def save(self, directory: str | Path, model_max_length: int | None = None) -> None:
        """Write tokenizer.json, tokenizer_config.json, special_tokens_map.json (PreTrainedTokenizerFast)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self._tok.encode_special_tokens = False  # the saved file parses specials, as HF tokenizers do
        try:
            self._tok.save(str(d / "tokenizer.json"))
        finally:
            self._tok.encode_special_tokens = True
        special_map = {
            "bos_token": BOS,
            "eos_token": EOS,
            "pad_token": PAD,
            "additional_special_tokens": [FIM_BEGIN, FIM_HOLE, FIM_END],
        }
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **special_map,
            "add_bos_token": False,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": model_max_length or 1_000_000_000,
        }
        (d / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
        (d / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")

    # ------------------------------------------------------------ ids
    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str) -> int:
        i = self._tok.token_to_id(token)
        if i is None:
            raise ValueError(f"unknown token {token!r}")
        return i

    @property
    def bos_id(self) -> int:
        return self.token_id(BOS)

    @property
    def eos_id(self) -> int:
        return self.token_id(EOS)

    @property
    def pad_id(self) -> int:
        return self.token_id(PAD)

    @property
    def fim_ids(self) -> tuple[int, int, int]:
        """(<|fim_begin|>, <|fim_hole|>, <|fim_end|>)."""
        return self.token_id(FIM_BEGIN), self.token_id(FIM_HOLE), self.token_id(FIM_END)

    @cached_property
    def _byte_ids(self) -> list[int]:
        """Token id of each single byte 0..255."""
        chars = _bytes_to_unicode()
        return [self.token_id(chars[b]) for b in range(256)]

    @cached_property
    def token_bytes(self) -> list[bytes]:
        """The bytes each token id stands for (special tokens: their text)."""
        to_byte = {c: b for b, c in _bytes_to_unicode().items()}
        specials = set(SPECIAL_TOKENS)
        out = []
        for i in range(self.vocab_size):
            t = self._tok.id_to_token(i)
            if t is None:
                out.append(b"")
            elif t in specials:
                out.append(t.encode())
            else:
                out.append(bytes(to_byte[c] for c in t))
        return out

    @cached_property
    def token_byte_lengths(self) -> list[int]:
        """UTF-8 bytes of text each id covers; special tokens cover none (for bits per byte)."""
        specials = {self.token_id(t) for t in SPECIAL_TOKENS}
        return [0 if i in specials else len(b) for i, b in enumerate(self.token_bytes)]

    # ------------------------------------------------------------ encode / decode
    def encode(self, text: str) -> list[int]:
        """Text -> ids, no BOS/EOS added; literal special-token text is encoded as ordinary text."""
        if _has_surrogates(text):
            return self.encode_bytes(text.encode("utf-8", "surrogatepass"))
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        if any(_has_surrogates(t) for t in texts):
            return [self.encode(t) for t in texts]
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def encode_bytes(self, data: bytes) -> list[int]:
        """Any bytes -> ids: valid UTF-8 runs through BPE, each invalid byte as its byte token."""
        text = data.decode("utf-8", errors="surrogateescape")
        ids: list[int] = []
        pos = 0
        for m in _ESCAPED.finditer(text):
            if m.start() > pos:
                ids += self._tok.encode(text[pos : m.start()], add_special_tokens=False).ids
            ids.append(self._byte_ids[ord(m.group()) - 0xDC00])
            pos = m.end()
        if pos < len(text):
            ids += self._tok.encode(text[pos:], add_special_tokens=False).ids
        return ids

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        table = self.token_bytes
        try:
            return b"".join(table[i] for i in ids)
        except IndexError:
            bad = [i for i in ids if not 0 <= i < len(table)]
            raise ValueError(f"token ids out of range [0, {len(table)}): {bad[:5]}") from None

    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> text (special tokens appear as their text; invalid UTF-8 becomes U+FFFD)."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")


def _has_surrogates(text: str) -> bool:
    return any("\ud800" <= ch <= "\udfff" for ch in text) if not text.isascii() else False
