"""lm-evaluation-harness on dsv3's engine: the `dsv3` model of lm_eval (`DSV3LM`).

    from dsv3.tasks.harness import DSV3LM
    lm = DSV3LM("runs/tiny", batch_size=16)             # or DSV3LM(llm) around a loaded dsv3.LLM
    lm_eval.simple_evaluate(model=lm, tasks=["hellaswag"])

Importing this module registers the class under the name "dsv3" in lm_eval's model registry, so
`python -m dsv3.tasks.harness --model dsv3 --model_args pretrained=RUN --tasks ...` is lm_eval's own CLI
with dsv3 available (lm_eval has no plugin entry points: a plain `lm_eval --model dsv3` cannot find it).

Numerics. Requests are tokenised as lm_eval's HF backend does: no BOS, `context + continuation` encoded
whole and split at the length of the encoded context (trailing context spaces move to the continuation;
an empty context is BOS), and special-token text is parsed to its id as transformers does. Every
log-probability comes from the engine's prompt log-probabilities (`SamplingParams.prompt_logprobs`): one
prefill per request, the raw log-softmax of the logits (no temperature), so loglikelihood is the sum over
the continuation tokens and is_greedy holds when each continuation token is the argmax (its log-prob
equals the best alternative's). A request longer than the engine's context keeps its last tokens.
`loglikelihood_rolling` scores a document in disjoint windows (lm_eval's rolling windows, BOS first),
each window a prompt of at most the engine's longest prompt. `generate_until` runs LLM.generate (greedy
unless do_sample) with the request's stop strings and max_gen_toks; the text is cut at the first stop.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lm_eval.models  # noqa: F401  (lm_eval's own models first: its registry loads them only when empty)
import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from dsv3.chat import render
from dsv3.inference import LLM, SamplingParams
from dsv3.inference.protocol import RequestOutput

DEFAULT_MAX_GEN_TOKS = 256


def _positive_int(name: str, value: Any) -> int:
    """An int from lm_eval's string model args ("8") or a Python int; ValueError naming the field."""
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a positive integer, got {value!r}") from None
    if n < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return n


def continuation_score(out: RequestOutput, ctxlen: int) -> tuple[float, bool]:
    """(sum of the log-probs of prompt tokens ctxlen.., all of them the argmax) from a scored prompt."""
    lps, tops = out.prompt_logprobs, out.prompt_top_logprobs
    if lps is None or tops is None:
        raise ValueError(f"request {out.request_id} came back without prompt log-probabilities")
    total, greedy = 0.0, True
    for lp, top in zip(lps[ctxlen:], tops[ctxlen:]):
        if lp is None or top is None:
            raise ValueError(f"request {out.request_id}: no log-probability for a scored token")
        total += lp
        greedy = greedy and lp >= max(top.values())
    return total, greedy


@register_model("dsv3")
class DSV3LM(TemplateLM):
    """An lm_eval LM over a dsv3.LLM: loglikelihood, loglikelihood_rolling, generate_until, batched.

    pretrained: a run or HF model directory (or a loaded dsv3.LLM); batch_size: sequences the engine runs
    together; max_length: context (default: the model's, at most 4096); dtype: float32 | bfloat16. An
    unknown model argument is a TypeError, not silently ignored."""

    def __init__(
        self,
        pretrained: str | Path | LLM,
        batch_size: int | str | None = 8,
        max_length: int | str | None = None,
        dtype: str | None = None,
        device: str | None = None,
        seed: int | str = 1234,
        max_gen_toks: int | str = DEFAULT_MAX_GEN_TOKS,
        max_batch_size: int | str | None = None,  # lm_eval's cap for batch_size=auto: auto is 8 here
    ):
        super().__init__()
        batch = 8 if batch_size in (None, "auto") or str(batch_size).startswith("auto") else batch_size
        batch = _positive_int("batch_size", batch)
        if isinstance(pretrained, LLM):
            self.llm = pretrained
        else:
            no_gpu = str(device).startswith("cuda") and not torch.cuda.is_available()
            if device in (None, "", "auto") or no_gpu:  # lm_eval's CLI asks for cuda by default
                device = "cuda" if torch.cuda.is_available() else "cpu"
            seq = None if max_length is None else _positive_int("max_length", max_length)
            self.llm = LLM(pretrained, dtype=dtype, max_batch_size=batch, max_seq_len=seq, device=device)
        if self.llm.tokenizer is None:
            raise ValueError("lm_eval works on text: the model directory needs a tokenizer.json")
        self.tok = self.llm.tokenizer
        self.name = str(pretrained) if not isinstance(pretrained, LLM) else "dsv3"
        self.batch_size = batch
        self.seed = int(seed)
        self.max_gen_toks = _positive_int("max_gen_toks", max_gen_toks)
        self._device = self.llm.model.embed.weight.device

    # ------------------------------------------------------------------ tokens
    @property
    def max_length(self) -> int:
        """The longest prompt the engine takes (one position stays free for a generated token)."""
        return self.llm.engine.max_seq_len - 1

    @property
    def eot_token_id(self) -> int:
        if self.tok.eos_id is None:
            raise ValueError("the tokenizer has no EOS token")
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        """What an empty context is: BOS (EOS when the tokenizer has none), as lm_eval's HF backend."""
        return self.tok.bos_id if self.tok.bos_id is not None else self.eot_token_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """Text -> ids without BOS, special-token text parsed (transformers' `add_special_tokens=False`)."""
        ids = self.tok.encode_with_offsets(string)[0]
        return [self.prefix_token_id, *ids] if add_special_tokens and self.tok.bos_id is not None else ids

    def tok_decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(ids)

    @property
    def tokenizer_name(self) -> str:
        return self.name.replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.tok.chat_template if chat_template else None

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        """The model's own chat template (tokenizer_config.json's, else DeepSeek-V3's), as the server's."""
        return render(chat_history, add_generation_prompt=add_generation_prompt, tokenizer=self.tok)

    # ------------------------------------------------------------------ scoring
    def _score(self, prompts: list[list[int]]) -> list[RequestOutput]:
        """One prefill per prompt, no generation: the prompt tokens' log-probs and the top-1 alternative."""
        params = SamplingParams(max_new_tokens=0, temperature=0.0, prompt_logprobs=1)
        outs: list[RequestOutput] = []
        for i in range(0, len(prompts), self.batch_size * 16):  # bounded engine queues, same results
            outs += self.llm.generate(prompts[i : i + self.batch_size * 16], params)
        return outs

    def _loglikelihood_tokens(
        self, requests: list[tuple[tuple[str, str], list[int], list[int]]], disable_tqdm: bool = False
    ) -> list[tuple[float, bool]]:
        prompts, ctxlens = [], []
        for _, ctx, cont in requests:
            if not cont:
                raise ValueError("lm_eval asked for the log-likelihood of an empty continuation")
            whole = (ctx + cont)[-self.max_length :]  # keep the end: all of the continuation if it fits
            prompts.append(whole)
            ctxlens.append(max(len(whole) - len(cont), 1))  # the first token has no log-prob
        results = []
        for (args, _, _), out, ctxlen in zip(requests, self._score(prompts), ctxlens):
            res = continuation_score(out, ctxlen)
            self.cache_hook.add_partial("loglikelihood", args, res)
            results.append(res)
        return results

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        windows: list[tuple[int, list[int], int]] = []  # (request, prompt, scored tokens at its end)
        for i, req in enumerate(requests):
            (text,) = req.args
            rolling = get_rolling_token_windows(
                token_list=self.tok_encode(text),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length - 1,  # context + predictions = one prompt of max_length
                context_len=1,
            )
            for ctx, pred in map(make_disjoint_window, rolling):
                windows.append((i, ctx + pred, len(pred)))
        totals = [0.0] * len(requests)
        outs = self._score([w[1] for w in windows])
        for (i, prompt, n), out in zip(windows, outs):
            totals[i] += continuation_score(out, len(prompt) - n)[0]
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ------------------------------------------------------------------ generation
    def _sampling(self, gen_kwargs: dict[str, Any]) -> tuple[SamplingParams, list[str]]:
        kw = dict(gen_kwargs)
        until = kw.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        max_gen = _positive_int("max_gen_toks", kw.pop("max_gen_toks", self.max_gen_toks))
        do_sample = bool(kw.pop("do_sample", False))
        temperature = float(kw.pop("temperature", 1.0 if do_sample else 0.0))
        if not do_sample:
            temperature = 0.0
        params = SamplingParams(
            max_new_tokens=max_gen,
            temperature=temperature,
            top_p=float(kw.pop("top_p", 1.0)),
            top_k=int(kw.pop("top_k", 0) or 0),
            stop=until,
            seed=self.seed,
        ).validate()
        if kw:  # as vLLM's backend: a generation setting the engine does not have is an error
            raise ValueError(f"generation kwargs dsv3's engine does not support: {sorted(kw)}")
        return params, until

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        prompts, params, stops = [], [], []
        for req in requests:
            context, gen_kwargs = req.args
            p, until = self._sampling(gen_kwargs)
            p.max_new_tokens = min(p.max_new_tokens, self.max_length)
            room = self.llm.engine.max_seq_len - p.max_new_tokens
            ids = self.tok_encode(context)[-room:] or [self.prefix_token_id]
            prompts.append(ids)
            params.append(p)
            stops.append(until)
        results = []
        outs = self.llm.generate(prompts, params)
        for req, out, until in zip(requests, outs, stops):
            text = out.text
            for s in until:  # the engine already stops there; cut as lm_eval's other backends do
                text = text.split(s)[0]
            self.cache_hook.add_partial("generate_until", req.args, text)
            results.append(text)
        return results


if __name__ == "__main__":  # lm_eval's CLI with "dsv3" registered
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
