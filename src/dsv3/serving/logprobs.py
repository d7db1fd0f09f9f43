"""Engine log-probabilities (`RequestOutput.logprobs` / `top_logprobs` / `prompt_logprobs`) in OpenAI's
two layouts.

- completions (legacy): `{"tokens", "token_logprobs", "top_logprobs", "text_offset"}`, tokens as their
  decoded strings, each top_logprobs entry a {token string: logprob} dict holding the top-`logprobs`
  tokens and the chosen one (as vLLM does; with logprobs=0 only the chosen one). With `echo` the prompt's
  tokens come first, the first one's logprob and top_logprobs null.
- chat: `{"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}]}`
  with exactly top_logprobs alternatives per token.

Echo and BOS: the echoed tokens are the prompt's tokens as the engine ran them, so a text prompt shows
the tokenizer's BOS first (its text, e.g. `<｜begin▁of▁sentence｜>`, logprob null). The echoed text is
the prompt as sent, which has no BOS, so BOS takes no characters of it: its text_offset and the next
token's are both 0. A prompt sent as token ids runs (and is echoed) exactly as sent.
Without a tokenizer a token shows as `token_id:<id>` (vLLM's return_tokens_as_token_ids).
"""

from __future__ import annotations

from dsv3.inference.protocol import TokenizerProtocol
from dsv3.tokenizer import Tokenizer


class TokenStrings:
    """Token id -> the string and UTF-8 bytes OpenAI's logprobs show for it (cached)."""

    def __init__(self, tokenizer: TokenizerProtocol | None):
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def text(self, token: int) -> str:
        s = self._cache.get(token)
        if s is None:
            s = f"token_id:{token}" if self.tokenizer is None else self.tokenizer.decode([token])
            self._cache[token] = s
        return s

    def bytes(self, token: int) -> list[int]:
        if isinstance(self.tokenizer, Tokenizer):  # a byte-level token's own bytes, not U+FFFD's
            return list(self.tokenizer.decode_bytes([token]))
        return list(self.text(token).encode())


def legacy(
    ts: TokenStrings,
    ids: list[int],
    lps: list[float | None],
    tops: list[dict[int, float] | None] | None,
    start: int = 0,
    zero_width: int = 0,
) -> dict:
    """Completions layout for ids with their logprobs (None: no logprob) and top dicts (None: the chosen
    token only). text_offset counts from `start`; the first `zero_width` tokens (an echoed BOS) take no
    characters."""
    tokens = [ts.text(t) for t in ids]
    offsets, pos = [], start
    for i, s in enumerate(tokens):
        offsets.append(pos)
        pos += 0 if i < zero_width else len(s)
    top: list[dict[str, float] | None] = []
    for i, (t, lp) in enumerate(zip(ids, lps)):
        d = tops[i] if tops is not None else None
        if lp is None:
            top.append(None)
        else:
            strings: dict[str, float] = {}
            for k, v in (d if d is not None else {t: lp}).items():
                strings.setdefault(ts.text(k), v)  # tokens sharing a string (U+FFFD): the most likely
            top.append(strings)
    return {"tokens": tokens, "token_logprobs": list(lps), "top_logprobs": top, "text_offset": offsets}


def concat(a: dict, b: dict) -> dict:
    """Two legacy layouts one after the other (echoed prompt, then completion)."""
    return {k: a[k] + b[k] for k in a}


def chat(
    ts: TokenStrings, ids: list[int], lps: list[float], tops: list[dict[int, float]] | None, k: int
) -> dict:
    """Chat layout: {"content": [...]}, k alternatives per token (most likely first)."""
    content = []
    for i, (t, lp) in enumerate(zip(ids, lps)):
        alts = list((tops[i] if tops is not None else {}).items())[:k]
        content.append(
            {
                "token": ts.text(t),
                "logprob": lp,
                "bytes": ts.bytes(t),
                "top_logprobs": [{"token": ts.text(a), "logprob": v, "bytes": ts.bytes(a)} for a, v in alts],
            }
        )
    return {"content": content}
