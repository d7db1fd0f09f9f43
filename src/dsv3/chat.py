"""DeepSeek-V3's chat format: the Jinja template, rendering, and encoding with an assistant-token mask.

A conversation renders as (DeepSeek-V3's own template, reproduced here and checked byte for byte against it
in tests/unit/test_chat.py):

    BOS + system prompts joined by a blank line
    <｜User｜>question<｜Assistant｜>answer<｜end▁of▁sentence｜> ...
    <｜Assistant｜><think>\\n                         (the generation prompt)

Assistant content holding `</think>` keeps only what follows the last `</think>` (earlier reasoning is
dropped from the history). Tool calls render as
`<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>TYPE<｜tool▁sep｜>NAME\\n```json\\nARGS\\n```<｜tool▁call▁end｜>...
<｜tool▁calls▁end｜><｜end▁of▁sentence｜>`, tool results as
`<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>RESULT<｜tool▁output▁end｜>...<｜tool▁outputs▁end｜>`, and the
assistant turn after tool outputs carries no `<｜Assistant｜>` cue. The original's quirks are kept, since
rendering must equal it: the first tool call of the whole conversation opens with `<｜Assistant｜>` and
`<｜tool▁calls▁begin｜>`, later calls (in any later turn too) start with a newline; `<｜tool▁outputs▁begin｜>`
appears before the first tool result of the conversation only; no generation prompt follows tool outputs.
Tool-call arguments are used as given when a string (as the original) and JSON-encoded otherwise.

Rendering uses jinja2 the way transformers' `apply_chat_template` does (sandboxed, trim_blocks,
lstrip_blocks, a `tojson` that keeps non-ASCII, message keys whose value is None dropped, as OpenAI clients
send `"tool_calls": null`), so a template gives the same text in dsv3 and in HF. A tool-calling turn without
content renders as one with empty content.

`encode_chat` tokenizes the rendered text with special-token parsing (as HF does, so the ids equal
`apply_chat_template(..., tokenize=True)`) and marks the tokens an assistant turn adds to the rendering,
minus the leading part the generation prompt would already supply (the `<｜Assistant｜>` cue): what the model
produces after the prompt, its closing `<｜end▁of▁sentence｜>` included. It needs a template under which
rendering the first k messages is a prefix of rendering k+1 (DeepSeek-V3's is, with system messages first).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any, Protocol

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

BOS_TOKEN = "<｜begin▁of▁sentence｜>"
EOS_TOKEN = "<｜end▁of▁sentence｜>"
PAD_TOKEN = "<｜▁pad▁｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK_BEGIN = "<think>"
THINK_END = "</think>"
TOOL_TOKENS = (
    "<｜tool▁calls▁begin｜>",
    "<｜tool▁call▁begin｜>",
    "<｜tool▁sep｜>",
    "<｜tool▁call▁end｜>",
    "<｜tool▁calls▁end｜>",
    "<｜tool▁outputs▁begin｜>",
    "<｜tool▁output▁begin｜>",
    "<｜tool▁output▁end｜>",
    "<｜tool▁outputs▁end｜>",
)
CHAT_TOKENS = (USER, ASSISTANT, THINK_BEGIN, THINK_END, *TOOL_TOKENS)
"""The control tokens the template writes besides BOS/EOS: each must be one (special) token."""

# Written from the format above. `ns.tool_calls_seen` and `ns.first_output` are conversation-wide on purpose
# (DeepSeek-V3's template never resets them); `ns.after_tools` is "the last message was a tool result".
DEEPSEEK_V3_CHAT_TEMPLATE = (
    "{%- set ns = namespace(tool_calls_seen=false, after_tools=false, first_output=true) -%}\n"
    "{%- macro tool_call(call) -%}\n"
    "    {%- set args = call['function']['arguments'] -%}\n"
    "    {{- '<｜tool▁call▁begin｜>' + call['type'] + '<｜tool▁sep｜>' + call['function']['name'] -}}\n"
    "    {{- '\\n```json\\n' + (args if args is string else args | tojson) -}}\n"
    "    {{- '\\n```<｜tool▁call▁end｜>' -}}\n"
    "{%- endmacro -%}\n"
    "{{- bos_token -}}\n"
    "{{- messages | selectattr('role', 'equalto', 'system') | map(attribute='content') | join('\\n\\n') -}}\n"
    "{%- for message in messages -%}\n"
    "    {%- if message['role'] == 'user' -%}\n"
    "        {%- set ns.after_tools = false -%}\n"
    "        {{- '<｜User｜>' + message['content'] -}}\n"
    "    {%- elif message['role'] == 'assistant' and 'tool_calls' in message -%}\n"
    "        {%- set ns.after_tools = false -%}\n"
    "        {%- for call in message['tool_calls'] -%}\n"
    "            {%- if ns.tool_calls_seen -%}\n"
    "                {{- '\\n' + tool_call(call) -}}\n"
    "            {%- else -%}\n"
    "                {{- '<｜Assistant｜>' -}}\n"
    "                {%- if message['content'] is not none -%}{{- message['content'] -}}{%- endif -%}\n"
    "                {{- '<｜tool▁calls▁begin｜>' + tool_call(call) -}}\n"
    "                {%- set ns.tool_calls_seen = true -%}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "        {{- '<｜tool▁calls▁end｜><｜end▁of▁sentence｜>' -}}\n"
    "    {%- elif message['role'] == 'assistant' and ns.after_tools -%}\n"
    "        {{- '<｜tool▁outputs▁end｜>' + message['content'] + '<｜end▁of▁sentence｜>' -}}\n"
    "        {%- set ns.after_tools = false -%}\n"
    "    {%- elif message['role'] == 'assistant' -%}\n"
    "        {%- set answer = message['content'] -%}\n"
    "        {%- if '</think>' in answer -%}{%- set answer = answer.split('</think>')[-1] -%}{%- endif -%}\n"
    "        {{- '<｜Assistant｜>' + answer + '<｜end▁of▁sentence｜>' -}}\n"
    "    {%- elif message['role'] == 'tool' -%}\n"
    "        {%- set ns.after_tools = true -%}\n"
    "        {%- if ns.first_output -%}\n"
    "            {{- '<｜tool▁outputs▁begin｜>' -}}\n"
    "            {%- set ns.first_output = false -%}\n"
    "        {%- endif -%}\n"
    "        {{- '<｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>' -}}\n"
    "    {%- endif -%}\n"
    "{%- endfor -%}\n"
    "{%- if ns.after_tools -%}\n"
    "    {{- '<｜tool▁outputs▁end｜>' -}}\n"
    "{%- elif add_generation_prompt -%}\n"
    "    {{- '<｜Assistant｜><think>\\n' -}}\n"
    "{%- endif -%}\n"
)


class ChatTokenizer(Protocol):
    """What rendering and `encode_chat` need: dsv3.tokenizer.Tokenizer has these members."""

    @property
    def chat_template(self) -> str: ...

    @property
    def bos_token(self) -> str | None: ...

    @property
    def eos_token(self) -> str | None: ...

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[int]]:
        """Text with special tokens parsed -> (ids, start character of each id)."""
        ...


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys=False):
    """transformers' `tojson`: json.dumps without Jinja's HTML escaping."""
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    return env.from_string(template)


def render(
    messages: Sequence[Mapping[str, Any]],
    add_generation_prompt: bool = False,
    tokenizer: ChatTokenizer | None = None,
    *,
    template: str | None = None,
    bos_token: str | None = None,
    eos_token: str | None = None,
) -> str:
    """Messages -> prompt text. The template and BOS/EOS strings come from `tokenizer` when given, else
    DeepSeek-V3's template and tokens; `template`, `bos_token`, `eos_token` override either.

    Raises ValueError (naming the template's complaint) when the template fails on these messages."""
    if template is None:
        template = tokenizer.chat_template if tokenizer is not None else DEEPSEEK_V3_CHAT_TEMPLATE
    if bos_token is None:
        bos_token = tokenizer.bos_token if tokenizer is not None else BOS_TOKEN
    if eos_token is None:
        eos_token = tokenizer.eos_token if tokenizer is not None else EOS_TOKEN
    try:
        return _compile(template).render(
            messages=[{k: v for k, v in m.items() if v is not None} for m in messages],
            add_generation_prompt=add_generation_prompt,
            bos_token=bos_token or "",
            eos_token=eos_token or "",
        )
    except (jinja2.TemplateError, TypeError, KeyError) as e:
        raise ValueError(f"chat template failed on these messages: {type(e).__name__}: {e}") from e


def _common_prefix_len(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def assistant_spans(
    messages: Sequence[Mapping[str, Any]],
    tokenizer: ChatTokenizer | None = None,
    *,
    mask_from: int = 0,
    template: str | None = None,
) -> tuple[str, list[tuple[int, int]]]:
    """(rendered text, [start, end) character spans the model produces) for the assistant messages at
    index >= mask_from. Raises ValueError when the template is not prefix-stable on these messages."""
    kw = dict(tokenizer=tokenizer, template=template)
    full = render(messages, **kw)
    spans: list[tuple[int, int]] = []
    for i, m in enumerate(messages):
        if i < mask_from or m.get("role") != "assistant":
            continue
        before = render(messages[:i], **kw)
        cue = render(messages[:i], add_generation_prompt=True, **kw)
        after = render(messages[: i + 1], **kw)
        if not (after.startswith(before) and full.startswith(after)):
            raise ValueError(
                f"the chat template is not prefix-stable at message {i} (rendering the first messages is "
                "not a prefix of rendering more of them): cannot mark the assistant tokens"
            )
        start = len(before)
        if cue.startswith(before):  # skip what the generation prompt supplies, e.g. "<｜Assistant｜>"
            start += _common_prefix_len(cue[start:], after[start:])
        if start < len(after):
            spans.append((start, len(after)))
    return full, spans


def encode_chat(
    tokenizer: ChatTokenizer,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = False,
    mask_from: int = 0,
) -> tuple[list[int], list[bool]]:
    """Messages -> (ids, assistant_mask) through the tokenizer's chat template; mask[i] is True where ids[i]
    belongs to an assistant turn (index >= mask_from) that the model produces (completion-only loss).

    Special-token text in the rendering becomes special ids, exactly as transformers tokenizes a chat."""
    if add_generation_prompt:
        text = render(messages, add_generation_prompt=True, tokenizer=tokenizer)
        ids, _ = tokenizer.encode_with_offsets(text)
        return ids, [False] * len(ids)
    text, spans = assistant_spans(messages, tokenizer, mask_from=mask_from)
    ids, starts = tokenizer.encode_with_offsets(text)
    mask = [False] * len(ids)
    j = 0
    for k, s in enumerate(starts):
        while j < len(spans) and spans[j][1] <= s:
            j += 1
        mask[k] = j < len(spans) and spans[j][0] <= s
    return ids, mask
