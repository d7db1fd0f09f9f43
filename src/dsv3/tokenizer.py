"""Byte-level BPE tokenizer (the `tokenizers` library), saved as a tokenizer.json transformers loads.

Every byte is a base token (GPT-2's byte-to-unicode alphabet), so any text has an encoding, and merges
learned from the corpus sit on top. New tokenizers reserve DeepSeek-V3's special tokens first: BOS
`<｜begin▁of▁sentence｜>` (id 0), EOS `<｜end▁of▁sentence｜>` (1), pad `<｜▁pad▁｜>` (2), the three
Fill-in-the-Middle markers used in PSM form (`<｜fim▁begin｜>prefix<｜fim▁hole｜>suffix<｜fim▁end｜>middle`),
then the chat tokens (`<｜User｜>`, `<｜Assistant｜>`, `<think>`, `</think>`, the tool-call markers:
dsv3.chat.CHAT_TOKENS). Each is one added token; the byte-level pre-tokenizer splits `<`, letters and `｜`
apart, so merges of ordinary text can never produce one.

Any HF fast tokenizer loads (`from_file` on a tokenizer.json or a model directory): BOS, EOS and pad come
from the directory's tokenizer_config.json / special_tokens_map.json when present, else from the known
names in the vocabulary (DeepSeek's, or the `<|begin_of_text|>` family older dsv3 runs used); the chat
template from chat_template.jinja or tokenizer_config.json, else DeepSeek-V3's. `save` writes them all
back, the chat template included, so every exported model directory carries it.

`encode(text)` never turns literal special-token text inside `text` into special ids (data cannot inject
control tokens); `encode_with_offsets` does parse them, for text a chat template rendered. `encode_bytes`/
`decode_bytes` round-trip arbitrary bytes, invalid UTF-8 included: valid UTF-8 runs go through BPE, each
invalid byte becomes its single-byte token.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from dsv3.chat import BOS_TOKEN, CHAT_TOKENS, DEEPSEEK_V3_CHAT_TEMPLATE, EOS_TOKEN, PAD_TOKEN

BOS = BOS_TOKEN
EOS = EOS_TOKEN
PAD = PAD_TOKEN
FIM_BEGIN = "<｜fim▁begin｜>"
FIM_HOLE = "<｜fim▁hole｜>"
FIM_END = "<｜fim▁end｜>"
SPECIAL_TOKENS = (BOS, EOS, PAD, FIM_BEGIN, FIM_HOLE, FIM_END, *CHAT_TOKENS)
MIN_VOCAB = 256 + len(SPECIAL_TOKENS)
# Written by dsv3 before the DeepSeek-V3 tokens: (BOS, EOS, PAD, FIM begin, hole, end). Still loaded.
LEGACY_SPECIAL_TOKENS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|pad|>",
    "<|fim_begin|>",
    "<|fim_hole|>",
    "<|fim_end|>",
)

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


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {path}: {e}") from e
    return data if isinstance(data, dict) else {}


def _config_chat_template(value: Any) -> str | None:
    """tokenizer_config.json's chat_template: a string, or a list of {name, template} (take "default")."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        t = named.get("default")
        return t if isinstance(t, str) else None
    return None


class Tokenizer:
    """Wraps a `tokenizers.Tokenizer` with the special tokens and chat template of its model directory.

    bos_token / eos_token / pad_token: None picks the first known name in the vocabulary (DeepSeek's, then
    dsv3's legacy one); a name given must be in the vocabulary. chat_template: None means DeepSeek-V3's."""

    def __init__(
        self,
        tok: HFTokenizer,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        chat_template: str | None = None,
    ):
        self._tok = tok
        self._tok.encode_special_tokens = True  # literal "<｜...｜>" in text stays text
        self.bos_token = self._pick("bos_token", bos_token, (BOS, LEGACY_SPECIAL_TOKENS[0]))
        self.eos_token = self._pick("eos_token", eos_token, (EOS, LEGACY_SPECIAL_TOKENS[1]))
        self.pad_token = self._pick("pad_token", pad_token, (PAD, LEGACY_SPECIAL_TOKENS[2]))
        self.chat_template = chat_template if chat_template is not None else DEEPSEEK_V3_CHAT_TEMPLATE

    def _pick(self, what: str, given: str | None, known: tuple[str, ...]) -> str | None:
        if given is not None:
            if self._tok.token_to_id(given) is None:
                raise ValueError(f"{what} {given!r} is not in the tokenizer's vocabulary")
            return given
        return next((t for t in known if self._tok.token_to_id(t) is not None), None)

    # ------------------------------------------------------------ build / load / save
    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, *, split_digits: bool = False) -> Tokenizer:
        """Learn byte-level BPE merges from `texts` up to `vocab_size` tokens (specials and bytes count).

        split_digits: every digit is its own pre-token, so numbers are spelled digit by digit (as
        LLaMA's and DeepSeek-LLM's tokenizers do; DeepSeek-V3's splits numbers into runs of up to 3):
        copying a number (a passkey) then means copying ten well-trained tokens, not rare merges."""
        if not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB:
            raise ValueError(
                f"vocab_size must be an integer >= {MIN_VOCAB} (256 bytes + specials), got {vocab_size!r}"
            )
        tok = HFTokenizer(models.BPE())
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.pre_tokenizer = (
            pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
            if split_digits
            else byte_level
        )
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=2,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok, bos_token=BOS, eos_token=EOS, pad_token=PAD)

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        """Load tokenizer.json, or the tokenizer.json inside a directory (an HF model dir or a run dir),
        with the special tokens and chat template of the files beside it (HF's tokenizer_config.json,
        special_tokens_map.json, chat_template.jinja)."""
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
        config = _read_json(p.parent / "tokenizer_config.json")
        special_map = _read_json(p.parent / "special_tokens_map.json")

        def special(key: str) -> str | None:
            return _token_text(config.get(key)) or _token_text(special_map.get(key))

        jinja_file = p.parent / "chat_template.jinja"
        template = (
            jinja_file.read_text(encoding="utf-8")
            if jinja_file.is_file()
            else _config_chat_template(config.get("chat_template"))
        )
        return cls(
            HFTokenizer.from_file(str(p)),
            bos_token=special("bos_token"),
            eos_token=special("eos_token"),
            pad_token=special("pad_token"),
            chat_template=template,
        )

    def save(self, directory: str | Path, model_max_length: int | None = None) -> None:
        """Write tokenizer.json, tokenizer_config.json (with `chat_template`), special_tokens_map.json: the
        files transformers' PreTrainedTokenizerFast reads."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self._tok.encode_special_tokens = False  # the saved file parses specials, as HF tokenizers do
        try:
            self._tok.save(str(d / "tokenizer.json"))
        finally:
            self._tok.encode_special_tokens = True
        named = {"bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": self.pad_token}
        named = {k: v for k, v in named.items() if v is not None}
        others = [t for i, t in sorted(self._special_tokens.items()) if t not in named.values()]
        special_map = {**named, "additional_special_tokens": others}
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **special_map,
            "add_bos_token": False,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": model_max_length or 1_000_000_000,
            "chat_template": self.chat_template,
        }
        (d / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        (d / "special_tokens_map.json").write_text(
            json.dumps(special_map, indent=2, ensure_ascii=False) + "\n"
        )

    # ------------------------------------------------------------ ids
    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str) -> int:
        i = self._tok.token_to_id(token)
        if i is None:
            raise ValueError(f"unknown token {token!r}")
        return i

    def _optional_id(self, token: str | None) -> int | None:
        return None if token is None else self.token_id(token)

    @property
    def bos_id(self) -> int | None:
        """Put in front of each document and prompt; None when the tokenizer has no BOS."""
        return self._optional_id(self.bos_token)

    @property
    def eos_id(self) -> int | None:
        """Ends each document and assistant turn; None when the tokenizer has no EOS."""
        return self._optional_id(self.eos_token)

    @property
    def pad_id(self) -> int | None:
        return self._optional_id(self.pad_token)

    @property
    def fim_ids(self) -> tuple[int, int, int]:
        """(FIM begin, hole, end): DeepSeek's `<｜fim▁begin｜>`... or dsv3's legacy `<|fim_begin|>`..."""
        for names in ((FIM_BEGIN, FIM_HOLE, FIM_END), LEGACY_SPECIAL_TOKENS[3:]):
            ids = [self._tok.token_to_id(t) for t in names]
            if all(i is not None for i in ids):
                return ids[0], ids[1], ids[2]
        raise ValueError(
            f"fill-in-the-middle needs the tokens {[FIM_BEGIN, FIM_HOLE, FIM_END]}: this tokenizer lacks them"
        )

    @cached_property
    def _special_tokens(self) -> dict[int, str]:
        """id -> text of every added token marked special."""
        return {i: t.content for i, t in self._tok.get_added_tokens_decoder().items() if t.special}

    @cached_property
    def _byte_ids(self) -> list[int]:
        """Token id of each single byte 0..255."""
        chars = _bytes_to_unicode()
        return [self.token_id(chars[b]) for b in range(256)]

    @cached_property
    def token_bytes(self) -> list[bytes]:
        """The bytes each token id stands for (special tokens: their text)."""
        to_byte = {c: b for b, c in _bytes_to_unicode().items()}
        specials = self._special_tokens
        out = []
        for i in range(self.vocab_size):
            t = self._tok.id_to_token(i)
            if t is None:
                out.append(b"")
            elif i in specials or not all(c in to_byte for c in t):  # added non-byte-level text as is
                out.append(t.encode())
            else:
                out.append(bytes(to_byte[c] for c in t))
        return out

    @cached_property
    def token_byte_lengths(self) -> list[int]:
        """UTF-8 bytes of text each id covers; special tokens cover none (for bits per byte)."""
        specials = self._special_tokens
        return [0 if i in specials else len(b) for i, b in enumerate(self.token_bytes)]

    @cached_property
    def _tok_parsing_specials(self) -> HFTokenizer:
        t = HFTokenizer.from_str(self._tok.to_str())
        t.encode_special_tokens = False
        return t

    # ------------------------------------------------------------ encode / decode
    def encode(self, text: str) -> list[int]:
        """Text -> ids, no BOS/EOS added; literal special-token text is encoded as ordinary text."""
        if _has_surrogates(text):
            return self.encode_bytes(text.encode("utf-8", "surrogatepass"))
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[int]]:
        """Rendered chat text -> (ids, start character of each id), special-token text parsed to its id
        (as transformers tokenizes a chat template's output)."""
        if _has_surrogates(text):
            raise ValueError("chat text holds unpaired surrogates (not valid Unicode)")
        enc = self._tok_parsing_specials.encode(text, add_special_tokens=False)
        return enc.ids, [start for start, _ in enc.offsets]

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
