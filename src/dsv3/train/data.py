"""Training data: corpus loading, the train/val split, document packing, Fill-in-the-Middle, data order.

- Corpus: the bundled tinyshakespeare (default), a text file, a directory of .txt files (sorted paths,
  one document each) or a .jsonl file with {"text": ...} per line.
- Split: the documents are laid end to end and cut at (1 - val_frac) of their characters; the last
  val_frac is validation (for a single file: exactly nanoGPT's split, so bits per byte compare).
- Packing: each document becomes BOS + tokens + EOS; the documents are concatenated into one stream and
  cut into windows of seq_len + 1 tokens (inputs and next-token labels). No cross-document masking: a
  window may span documents, as in the paper.
- Order: epoch e uses a random offset in [0, seq_len) and a random permutation of its windows, both from
  a generator seeded with (seed, e). The position is (epoch, cursor): a resumed run continues exactly.
- FIM (PSM, DeepSeek's format): with probability fim_rate, each document piece inside a window becomes
  `<|fim_begin|> prefix <|fim_hole|> suffix <|fim_end|> middle`, cut at two uniform token positions; the
  window is then cut back to seq_len + 1 tokens. The decision and cut points come from a generator
  seeded with (seed, epoch, window), so FIM needs no state of its own.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from dsv3.tokenizer import Tokenizer


def bundled_corpus_path() -> Path:
    return Path(str(resources.files("dsv3") / "data" / "tinyshakespeare.txt"))


def load_corpus(path: str | Path | None = None) -> list[str]:
    """Documents of a corpus: None -> bundled tinyshakespeare; .txt file; directory of .txt; .jsonl."""
    p = bundled_corpus_path() if path is None else Path(path)
    if not p.exists():
        raise ValueError(f"data path not found: {p}")
    if p.is_dir():
        files = sorted(f for f in p.rglob("*.txt") if f.is_file())
        if not files:
            raise ValueError(f"no .txt files under {p}")
        docs = [f.read_text(encoding="utf-8", errors="replace") for f in files]
    elif p.suffix == ".jsonl":
        docs = []
        with p.open(encoding="utf-8") as fh:
            for n, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{p}:{n}: not valid JSON ({e.msg})") from None
                if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                    raise ValueError(f'{p}:{n}: expected an object with a string "text" field')
                docs.append(rec["text"])
    else:
        docs = [p.read_text(encoding="utf-8", errors="replace")]
    docs = [d for d in docs if d]
    if not docs:
        raise ValueError(f"the corpus at {p} is empty")
    return docs


def split_train_val(docs: list[str], val_frac: float = 0.1) -> tuple[list[str], list[str]]:
    """Cut the concatenated documents at int(total_chars * (1 - val_frac)); the tail is validation."""
    if not 0 < val_frac < 1:
        raise ValueError(f"val_frac must be in (0, 1), got {val_frac}")
    total = sum(len(d) for d in docs)
    cut = int(total * (1 - val_frac))
    train: list[str] = []
    val: list[str] = []
    seen = 0
    for d in docs:
        if seen + len(d) <= cut:
            train.append(d)
        elif seen >= cut:
            val.append(d)
        else:
            train.append(d[: cut - seen])
            val.append(d[cut - seen :])
        seen += len(d)
    if not train or not val:
        raise ValueError("the corpus is too small to split into train and validation")
    return train, val


def tokenize_documents(tok: Tokenizer, docs: list[str]) -> np.ndarray:
    """Each document -> BOS + ids + EOS, concatenated; int32 [N]."""
    bos, eos = tok.bos_id, tok.eos_id
    parts = []
    for ids in tok.encode_batch(docs):
        parts.append(np.asarray([bos, *ids, eos], dtype=np.int32))
    return np.concatenate(parts)


def tokens_digest(tokens: np.ndarray) -> str:
    """A short fingerprint of a token stream: a resumed run checks that its data did not change."""
    return hashlib.sha256(np.ascontiguousarray(tokens, dtype=np.int32).tobytes()).hexdigest()[:16]


def fim_permute(
    window: np.ndarray,
    rng: np.random.Generator,
    fim_rate: float,
    fim_ids: tuple[int, int, int],
    bos_id: int,
    eos_id: int,
) -> np.ndarray:
    """PSM-transform each document piece of `window` with probability fim_rate; same length out.

    A piece runs up to and including an EOS; a leading BOS and trailing EOS stay in place:
    [BOS] <|fim_begin|> prefix <|fim_hole|> suffix <|fim_end|> middle [EOS]."""
    begin, hole, end = fim_ids
    cuts = np.flatnonzero(window == eos_id) + 1
    pieces = np.split(window, cuts)
    out = []
    changed = False
    for piece in pieces:
        if len(piece) == 0:
            continue
        if rng.random() >= fim_rate:
            out.append(piece)
            continue
        head = piece[:1] if piece[0] == bos_id else piece[:0]
        tail = piece[-1:] if piece[-1] == eos_id else piece[:0]
        body = piece[len(head) : len(piece) - len(tail)]
        if len(body) < 2:
            out.append(piece)
            continue
        i, j = np.sort(rng.integers(0, len(body) + 1, size=2))
        prefix, middle, suffix = body[:i], body[i:j], body[j:]
        out.append(
            np.concatenate([head, [begin], prefix, [hole], suffix, [end], middle, tail]).astype(window.dtype)
        )
        changed = True
    if not changed:
        return window
    return np.concatenate(out)[: len(window)]


@dataclass
class DataState:
    epoch: int = 0
    cursor: int = 0  # windows of this epoch already used

    def to_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor}


class PackedDataset:
    """Deterministic, resumable stream of packed (inputs, labels) batches over a token array."""

    def __init__(
        self,
        tokens: np.ndarray,
        seq_len: int,
        seed: int = 0,
        fim_rate: float = 0.0,
        fim_ids: tuple[int, int, int] | None = None,
        bos_id: int = 0,
        eos_id: int = 1,
    ):
        if len(tokens) < 2 * seq_len + 2:
            raise ValueError(
                f"the training split has {len(tokens)} tokens: too few for seq_len={seq_len} "
                "(need at least two windows); use more data or a shorter seq_len"
            )
        if fim_rate > 0 and fim_ids is None:
            raise ValueError("fim_rate > 0 needs the FIM token ids")
        self.tokens = np.asarray(tokens, dtype=np.int64)
        self.seq_len = seq_len
        self.seed = seed
        self.fim_rate = fim_rate
        self.fim_ids = fim_ids
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.state = DataState()
        self._epoch_cache: tuple[int, np.ndarray] | None = None

    def epoch_starts(self, epoch: int) -> np.ndarray:
        """Window start offsets of `epoch`, in the order they are used."""
        if self._epoch_cache is not None and self._epoch_cache[0] == epoch:
            return self._epoch_cache[1]
        rng = np.random.default_rng([self.seed, epoch])
        T = self.seq_len
        offset = int(rng.integers(0, T))
        n = (len(self.tokens) - 1 - offset) // T
        starts = offset + T * rng.permutation(n)
        self._epoch_cache = (epoch, starts)
        return starts

    def window(self, epoch: int, index: int, start: int) -> np.ndarray:
        w = self.tokens[start : start + self.seq_len + 1]
        if self.fim_rate > 0:
            rng = np.random.default_rng([self.seed, epoch, index, 1])
            w = fim_permute(w, rng, self.fim_rate, self.fim_ids, self.bos_id, self.eos_id)
        return w

    def next_batch(self, batch_size: int, rank: int = 0, world: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """The next `batch_size` windows (the global batch); this rank gets rows rank::world.

        Every rank advances the same position, so all ranks stay in step. Returns int64 [b, T] twice."""
        if batch_size % world:
            raise ValueError(f"batch size {batch_size} is not divisible by the data-parallel world {world}")
        rows = []
        for k in range(batch_size):
            starts = self.epoch_starts(self.state.epoch)
            if self.state.cursor >= len(starts):
                self.state = DataState(self.state.epoch + 1, 0)
                starts = self.epoch_starts(self.state.epoch)
            if k % world == rank:
                rows.append(self.window(self.state.epoch, self.state.cursor, int(starts[self.state.cursor])))
            self.state.cursor += 1
        batch = torch.from_numpy(np.stack(rows))
        return batch[:, :-1].contiguous(), batch[:, 1:].contiguous()

    def state_dict(self) -> dict[str, int]:
        return self.state.to_dict()

    def load_state_dict(self, d: dict[str, int]) -> None:
        self.state = DataState(int(d["epoch"]), int(d["cursor"]))


def eval_windows(tokens: np.ndarray, seq_len: int) -> np.ndarray:
    """Non-overlapping windows of seq_len + 1 tokens from the start, in order: [n, T + 1] int64."""
    n = (len(tokens) - 1) // seq_len
    if n == 0:
        raise ValueError(f"the validation split has {len(tokens)} tokens: too few for seq_len={seq_len}")
    idx = np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
    return np.asarray(tokens, dtype=np.int64)[idx]


def bigram_bpb(train_text: str, val_text: str, alpha: float = 0.01) -> float:
    """Bits per byte of an add-alpha smoothed byte bigram model fit on train_text, scored on val_text."""
    tr = np.frombuffer(train_text.encode("utf-8"), dtype=np.uint8).astype(np.int64)
    va = np.frombuffer(val_text.encode("utf-8"), dtype=np.uint8).astype(np.int64)
    if len(tr) < 2 or len(va) < 2:
        raise ValueError("bigram_bpb needs at least two bytes of train and validation text")
    counts = np.bincount(tr[:-1] * 256 + tr[1:], minlength=256 * 256).reshape(256, 256).astype(np.float64)
    probs = (counts + alpha) / (counts.sum(1, keepdims=True) + 256 * alpha)
    # the first val byte follows the last train byte, as in a stream
    prev = np.concatenate([tr[-1:], va[:-1]])
    return float(-np.log2(probs[prev, va]).mean())
