"""Supervised fine-tuning data: TRL's record formats, validation, tokenization with a loss mask, packing.

Records (one JSON object a line; a path is a .jsonl file or a directory of them, read in sorted order):

    {"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}, ...]}
    {"prompt": "text", "completion": "text"}                      (plain prompt-completion)
    {"prompt": [messages], "completion": [messages]}              (conversational prompt-completion)
    {"text": "..."}                                               (language modeling)

Other keys are ignored. Every record is checked before any is tokenized, and every error names the file, the
line and the field (`data/a.jsonl:12: messages[3].content: expected a string, got int`).

Tokenization (`loss_on="completion"`, the default, as TRL's completion_only_loss / assistant_only_loss):
- messages: the tokenizer's chat template (dsv3.chat.encode_chat); the loss is on the assistant turns, what
  the model says after `<｜Assistant｜>`, its closing EOS included. DeepSeek's template drops the reasoning
  (`<think>...</think>`) of assistant turns; the last turn, the one a distillation sample teaches, keeps it:
  it is tokenized as the generation prompt (which opens `<think>\n`) followed by the turn as written, so
  training matches what the model sees when it generates (earlier turns' reasoning is dropped, as the
  template drops it from history);
- conversational prompt-completion: the template over prompt + completion, loss on the completion's assistant
  turns only;
- plain prompt-completion: BOS + prompt + completion + EOS (no template, as TRL), loss on completion + EOS;
- text: BOS + text + EOS, loss on every token.
`loss_on="all"` puts the loss on every token of every format.

Packing (`pack`): best-fit-decreasing into rows of `seq_len` tokens. Samples are placed longest first, each
into the open row with the least room that still fits it (a new row when none does). Each row carries
`segment_ids` (0, 1, 2, ... per sample; PAD_SEGMENT = -1 on padding) for block-diagonal attention,
`positions` restarting at 0 in each sample, and `labels` shifted for next-token loss: labels[t] = ids[t + 1]
where that token is a target of the same sample, else -100, so the last token of a sample predicts nothing
and no token predicts across a boundary. (MTP depth k must likewise drop targets whose segment differs.)
A sample longer than `seq_len` is truncated to its first `seq_len` tokens, as TRL does, with one warning
giving the count.
"""

from __future__ import annotations

import bisect
import json
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dsv3.chat import encode_chat
from dsv3.tokenizer import Tokenizer

IGNORE_INDEX = -100  # as dsv3.model.IGNORE_INDEX (cross-entropy skips it)
PAD_SEGMENT = -1
LOSS_ON = ("completion", "all")
ROLES = ("system", "user", "assistant", "tool")


class SFTDataError(ValueError):
    """A bad record: the message names the file, line and field."""


@dataclass(frozen=True)
class SFTRecord:
    source: str  # "file:line"
    kind: str  # "messages" | "prompt_completion" | "conversational_prompt_completion" | "text"
    data: dict[str, Any]


@dataclass(frozen=True)
class SFTSample:
    """One tokenized record: loss_mask[i] is True where input_ids[i] is a training target."""

    input_ids: list[int]
    loss_mask: list[bool]
    source: str


@dataclass(frozen=True)
class PackedRow:
    """One packed training row, every array [seq_len] int64."""

    input_ids: np.ndarray
    labels: np.ndarray  # next-token targets, IGNORE_INDEX where masked or at a sample's end
    positions: np.ndarray  # restart at 0 in each sample
    segment_ids: np.ndarray  # 0, 1, ... per sample; PAD_SEGMENT on padding
    n_samples: int


# ---------------------------------------------------------------------------- reading and validation
def _files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.jsonl") if p.is_file())
        if not files:
            raise SFTDataError(f"{path}: no .jsonl files in this directory")
        return files
    if not path.is_file():
        raise SFTDataError(f"{path}: no such file or directory")
    return [path]


def _type(v: Any) -> str:
    return "null" if v is None else type(v).__name__


def _check_messages(msgs: Any, field: str) -> None:
    if not isinstance(msgs, list) or not msgs:
        raise SFTDataError(f"{field}: expected a non-empty list of messages, got {_type(msgs)}")
    for i, m in enumerate(msgs):
        f = f"{field}[{i}]"
        if not isinstance(m, dict):
            raise SFTDataError(f"{f}: expected an object with role and content, got {_type(m)}")
        role = m.get("role")
        if role not in ROLES:
            raise SFTDataError(f"{f}.role: expected one of {list(ROLES)}, got {role!r}")
        calls = m.get("tool_calls")
        if calls is not None:
            if role != "assistant":
                raise SFTDataError(f"{f}.tool_calls: only assistant messages make tool calls")
            if not isinstance(calls, list) or not calls:
                raise SFTDataError(f"{f}.tool_calls: expected a non-empty list, got {_type(calls)}")
            for j, c in enumerate(calls):
                fn = c.get("function") if isinstance(c, dict) else None
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                    raise SFTDataError(f"{f}.tool_calls[{j}].function.name: expected a string")
                if not isinstance(fn.get("arguments"), str | dict):
                    raise SFTDataError(f"{f}.tool_calls[{j}].function.arguments: expected a string or object")
                if not isinstance(c.get("type", "function"), str):
                    raise SFTDataError(f"{f}.tool_calls[{j}].type: expected a string")
        content = m.get("content")
        if not (isinstance(content, str) or (content is None and calls is not None)):
            raise SFTDataError(f"{f}.content: expected a string, got {_type(content)}")


def _classify(obj: Any) -> str:
    """The record's TRL format, after checking its fields (raises SFTDataError naming the field)."""
    if not isinstance(obj, dict):
        raise SFTDataError(f"expected a JSON object, got {_type(obj)}")
    keys = [k for k in ("messages", "prompt", "text") if k in obj]
    if len(keys) != 1:
        found = f"found {keys}" if keys else f"found only {sorted(obj)[:8]}"
        raise SFTDataError(
            f"expected exactly one of 'messages', 'prompt' (+ 'completion') or 'text'; {found}"
        )
    if keys[0] == "messages":
        _check_messages(obj["messages"], "messages")
        if not any(m["role"] == "assistant" for m in obj["messages"]):
            raise SFTDataError("messages: no assistant message, nothing to learn")
        return "messages"
    if keys[0] == "text":
        if not isinstance(obj["text"], str) or not obj["text"]:
            raise SFTDataError(f"text: expected a non-empty string, got {_type(obj['text'])}")
        return "text"
    if "completion" not in obj:
        raise SFTDataError("completion: missing (a 'prompt' record needs a 'completion')")
    prompt, completion = obj["prompt"], obj["completion"]
    if isinstance(prompt, str):
        if not isinstance(completion, str) or not completion:
            raise SFTDataError(
                f"completion: expected a non-empty string like the prompt, got {_type(completion)}"
            )
        return "prompt_completion"
    _check_messages(prompt, "prompt")
    _check_messages(completion, "completion")
    if not any(m["role"] == "assistant" for m in completion):
        raise SFTDataError("completion: no assistant message, nothing to learn")
    return "conversational_prompt_completion"


def _read_file(path: Path) -> Iterator[SFTRecord]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise SFTDataError(f"{path}: cannot read: {e}") from e
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise SFTDataError(f"{where}: invalid JSON: {e.msg} at column {e.colno}") from None
        try:
            kind = _classify(obj)
        except SFTDataError as e:
            raise SFTDataError(f"{where}: {e}") from None
        yield SFTRecord(where, kind, obj)


def read_sft_records(path: str | Path) -> list[SFTRecord]:
    """Every record of a .jsonl file or a directory of them, validated; raises SFTDataError at the first
    bad one (file:line: field: problem)."""
    records = [r for f in _files(Path(path)) for r in _read_file(f)]
    if not records:
        raise SFTDataError(f"{path}: no records")
    return records


# ---------------------------------------------------------------------------- tokenization
def _encode_messages(tokenizer: Tokenizer, msgs: list[dict], mask_from: int) -> tuple[list[int], list[bool]]:
    """encode_chat, except that a last assistant turn holding reasoning keeps it (module docstring)."""
    last = msgs[-1]
    content = last.get("content") or ""
    if (
        last.get("role") != "assistant"
        or "</think>" not in content
        or len(msgs) < 2
        or last.get("tool_calls")
    ):
        return encode_chat(tokenizer, msgs, mask_from=mask_from)
    hist_ids, hist_mask = encode_chat(tokenizer, msgs[:-1], mask_from=mask_from)
    prompt_ids, _ = encode_chat(tokenizer, msgs[:-1], add_generation_prompt=True)
    if prompt_ids[: len(hist_ids)] != hist_ids:
        raise ValueError("the chat template's generation prompt does not extend the conversation")
    opened = tokenizer.decode(prompt_ids[len(hist_ids) :]).endswith("<think>\n")
    if opened and content.startswith("<think>\n"):
        content = content[len("<think>\n") :]
    completion, _ = tokenizer.encode_with_offsets(content)
    completion += [] if tokenizer.eos_id is None else [tokenizer.eos_id]
    mask = hist_mask + [False] * (len(prompt_ids) - len(hist_ids)) + [True] * len(completion)
    return prompt_ids + completion, mask


def tokenize_record(tokenizer: Tokenizer, record: SFTRecord, loss_on: str = "completion") -> SFTSample:
    """One validated record -> input_ids and loss_mask (see the module docstring)."""
    if loss_on not in LOSS_ON:
        raise ValueError(f"loss_on must be one of {list(LOSS_ON)}, got {loss_on!r}")
    d = record.data
    try:
        if record.kind in ("messages", "conversational_prompt_completion"):
            if record.kind == "messages":
                msgs, mask_from = d["messages"], 0
            else:
                msgs, mask_from = [*d["prompt"], *d["completion"]], len(d["prompt"])
            ids, mask = _encode_messages(tokenizer, msgs, mask_from)
        else:
            bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
            eos = [] if tokenizer.eos_id is None else [tokenizer.eos_id]
            if record.kind == "text":
                ids = bos + tokenizer.encode(d["text"]) + eos
                mask = [True] * len(ids)
            else:
                head = bos + tokenizer.encode(d["prompt"])
                tail = tokenizer.encode(d["completion"]) + eos
                ids, mask = head + tail, [False] * len(head) + [True] * len(tail)
    except ValueError as e:
        raise SFTDataError(f"{record.source}: {e}") from None
    if loss_on == "all":
        mask = [True] * len(ids)
    if not any(mask[1:]):
        raise SFTDataError(f"{record.source}: no token to learn after tokenization")
    return SFTSample(ids, mask, record.source)


def load_sft_data(path: str | Path, tokenizer: Tokenizer, loss_on: str = "completion") -> list[SFTSample]:
    """Read, validate and tokenize SFT data (a .jsonl file or a directory of them) in TRL's formats.

    All records are validated first, then tokenized; an error (SFTDataError, a ValueError) names the file,
    line and field. loss_on: "completion" (assistant / completion tokens; every token of text records) or
    "all"."""
    if loss_on not in LOSS_ON:
        raise ValueError(f"loss_on must be one of {list(LOSS_ON)}, got {loss_on!r}")
    return [tokenize_record(tokenizer, r, loss_on) for r in read_sft_records(path)]


# ---------------------------------------------------------------------------- packing
def _best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins of sample indices: longest first, each into the fullest bin it still fits."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, bin index), sorted
    for i in order:
        n = lengths[i]
        k = bisect.bisect_left(free, (n, -1))
        if k == len(free):
            bins.append([i])
            room, b = capacity - n, len(bins) - 1
        else:
            room, b = free.pop(k)
            bins[b].append(i)
            room -= n
        if room > 0:
            bisect.insort(free, (room, b))
    return bins


def pack(samples: Sequence[SFTSample], seq_len: int, pad_id: int = 0) -> list[PackedRow]:
    """Pack samples into rows of seq_len tokens (best-fit-decreasing) with per-sample segment ids,
    positions and shifted labels (see the module docstring). Samples longer than seq_len are truncated to
    their first seq_len tokens, with a warning giving how many were."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    long = sum(len(s.input_ids) > seq_len for s in samples)
    if long:
        warnings.warn(
            f"{long} of {len(samples)} SFT samples are longer than seq_len={seq_len}: truncated to their "
            "first seq_len tokens",
            stacklevel=2,
        )
    lengths = [min(len(s.input_ids), seq_len) for s in samples]
    rows = []
    for members in _best_fit_decreasing(lengths, seq_len):
        ids = np.full(seq_len, pad_id, dtype=np.int64)
        labels = np.full(seq_len, IGNORE_INDEX, dtype=np.int64)
        positions = np.zeros(seq_len, dtype=np.int64)
        segments = np.full(seq_len, PAD_SEGMENT, dtype=np.int64)
        at = 0
        for seg, i in enumerate(members):
            n = lengths[i]
            x = np.asarray(samples[i].input_ids[:n], dtype=np.int64)
            m = np.asarray(samples[i].loss_mask[:n], dtype=bool)
            ids[at : at + n] = x
            labels[at : at + n - 1] = np.where(m[1:], x[1:], IGNORE_INDEX)
            positions[at : at + n] = np.arange(n)
            segments[at : at + n] = seg
            at += n
        positions[at:] = np.arange(seq_len - at)
        rows.append(PackedRow(ids, labels, positions, segments, len(members)))
    return rows


def stack_rows(rows: Sequence[PackedRow]) -> Mapping[str, np.ndarray]:
    """Rows -> {"input_ids", "labels", "positions", "segment_ids"}, each [len(rows), seq_len] int64."""
    if not rows:
        raise ValueError("no rows to stack")
    return {
        "input_ids": np.stack([r.input_ids for r in rows]),
        "labels": np.stack([r.labels for r in rows]),
        "positions": np.stack([r.positions for r in rows]),
        "segment_ids": np.stack([r.segment_ids for r in rows]),
    }
