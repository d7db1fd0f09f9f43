"""DeepSeek-V3 chat format: dsv3's template renders byte for byte what DeepSeek-V3's own template (shipped in
the `trl` wheel) renders, through transformers' apply_chat_template on a dsv3 tokenizer saved to disk and
through dsv3.chat.render; the ids equal transformers' and the assistant mask covers what the model says."""

from __future__ import annotations

from importlib import resources

import pytest

from dsv3.chat import (
    ASSISTANT,
    CHAT_TOKENS,
    DEEPSEEK_V3_CHAT_TEMPLATE,
    EOS_TOKEN,
    assistant_spans,
    encode_chat,
    render,
)
from dsv3.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")
trl_templates = pytest.importorskip("trl.chat_templates")

REFERENCE = (resources.files(trl_templates) / "deepseekv3.jinja").read_text(encoding="utf-8")


def _call(name: str, args: str, i: int = 0) -> dict:
    return {"id": f"c{i}", "type": "function", "function": {"name": name, "arguments": args}}


CONVERSATIONS = {
    "single_turn": [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}],
    "systems_joined": [
        {"role": "system", "content": "You are terse."},
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "Quatre."},
    ],
    "multi_turn": [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c  with  spaces\nand lines"},
        {"role": "assistant", "content": "d ünïcödé 漢字"},
        {"role": "user", "content": "e"},
    ],
    "reasoning_dropped": [
        {"role": "user", "content": "Think first."},
        {"role": "assistant", "content": "<think>\nlet me see\n</think>\n\nThe answer is 4."},
        {"role": "user", "content": "And again?"},
        {"role": "assistant", "content": "<think>a</think>b</think>final"},
    ],
    "tools": [
        {"role": "system", "content": "Use tools."},
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [_call("weather", '{"city": "Paris"}'), _call("weather", '{"city": "Rome"}', 1)],
        },
        {"role": "tool", "content": "18C"},
        {"role": "tool", "content": "24C"},
        {"role": "assistant", "content": "Paris 18C, Rome 24C."},
        {"role": "user", "content": "Now Oslo."},
        {
            "role": "assistant",
            "content": "Checking.",
            "tool_calls": [_call("weather", '{"city": "Oslo"}', 2)],
        },
        {"role": "tool", "content": "3C"},
    ],
    "tool_call_with_content": [
        {"role": "user", "content": "Search it."},
        {"role": "assistant", "content": "Sure.", "tool_calls": [_call("search", '{"q": "x"}')]},
        {"role": "tool", "content": "found"},
        {"role": "assistant", "content": "It is found."},
    ],
    "user_only": [{"role": "user", "content": "Hello"}],
}


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    text = (resources.files("dsv3.data") / "tinyshakespeare.txt").read_text()[:30_000]
    return Tokenizer.train([text], 400)


@pytest.fixture(scope="module")
def hf(tok, tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    tok.save(d)
    return transformers.PreTrainedTokenizerFast.from_pretrained(str(d))


def test_exported_directory_carries_the_template(hf):
    assert hf.chat_template == DEEPSEEK_V3_CHAT_TEMPLATE
    assert DEEPSEEK_V3_CHAT_TEMPLATE != REFERENCE  # written independently; equality is of the renderings


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("gen", [False, True])
def test_rendering_equals_deepseek_v3(tok, hf, name, gen):
    msgs = CONVERSATIONS[name]
    ref = hf.apply_chat_template(msgs, chat_template=REFERENCE, tokenize=False, add_generation_prompt=gen)
    ours_hf = hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
    ours = render(msgs, add_generation_prompt=gen, tokenizer=tok)
    assert ours_hf == ref
    assert ours == ref
    assert render(msgs, add_generation_prompt=gen) == ref  # no tokenizer: DeepSeek's own tokens
    ids = hf.apply_chat_template(msgs, chat_template=REFERENCE, tokenize=True, add_generation_prompt=gen)
    if isinstance(ids, dict) or not isinstance(ids, list):  # transformers 5 returns a BatchEncoding
        ids = ids["input_ids"]
    assert encode_chat(tok, msgs, add_generation_prompt=gen)[0] == ids


def test_rendering_details():
    msgs = CONVERSATIONS["systems_joined"]
    assert render(msgs).startswith("<｜begin▁of▁sentence｜>You are terse.\n\nAnswer in French.<｜User｜>")
    text = render(CONVERSATIONS["reasoning_dropped"], add_generation_prompt=True)
    assert "let me see" not in text and "<｜Assistant｜>\n\nThe answer is 4.<｜end▁of▁sentence｜>" in text
    assert "<｜Assistant｜>final<｜end▁of▁sentence｜>" in text and text.endswith("<｜Assistant｜><think>\n")
    # after tool outputs there is no generation prompt, and the outputs are closed
    assert render(CONVERSATIONS["tools"], add_generation_prompt=True).endswith(
        "<｜tool▁output▁begin｜>3C<｜tool▁output▁end｜><｜tool▁outputs▁end｜>"
    )


def test_none_values_are_dropped_as_in_transformers():
    with_empty = CONVERSATIONS["tools"]
    with_none = [
        {**m, "content": None} if m.get("tool_calls") and not m["content"] else m for m in with_empty
    ]
    assert with_none != with_empty
    assert render(with_none) == render(with_empty)
    plain = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "tool_calls": None}]
    assert render(plain) == render(plain[:1] + [{"role": "assistant", "content": "b"}])


def test_chat_tokens_are_single_special_tokens(tok):
    for t in CHAT_TOKENS:
        ids, _ = tok.encode_with_offsets(t)
        assert ids == [tok.token_id(t)]
        assert all(i not in ids for i in tok.encode(t))  # literal text in data stays ordinary text
        assert tok.token_byte_lengths[tok.token_id(t)] == 0


def _masked_text(tok, msgs, **kw) -> str:
    ids, mask = encode_chat(tok, msgs, **kw)
    return tok.decode([i for i, m in zip(ids, mask) if m])


def test_assistant_mask(tok):
    msgs = CONVERSATIONS["multi_turn"][:5]
    ids, mask = encode_chat(tok, msgs)
    assert len(ids) == len(mask) and ids[0] == tok.bos_id
    assert _masked_text(tok, msgs) == f"b{EOS_TOKEN}d ünïcödé 漢字{EOS_TOKEN}"
    assert tok.token_id(ASSISTANT) not in [i for i, m in zip(ids, mask) if m]  # the prompt cue is not learnt
    # mask_from: earlier (few-shot) assistant turns are context only
    assert _masked_text(tok, msgs, mask_from=3) == f"d ünïcödé 漢字{EOS_TOKEN}"
    tools = _masked_text(tok, CONVERSATIONS["tool_call_with_content"])
    assert tools.startswith("Sure.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>search")
    assert tools.endswith(f"<｜tool▁calls▁end｜>{EOS_TOKEN}It is found.{EOS_TOKEN}")
    assert "found<" not in tools.replace("It is found.", "")  # the tool's own output is not learnt
    assert encode_chat(tok, msgs, add_generation_prompt=True)[1] == [False] * len(
        encode_chat(tok, msgs, add_generation_prompt=True)[0]
    )


def test_template_errors_and_prefix_stability(tok):
    with pytest.raises(ValueError, match="chat template failed"):
        render([{"role": "user"}])
    late_system = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "system", "content": "late"},
    ]
    with pytest.raises(ValueError, match="prefix-stable at message 1"):
        assistant_spans(late_system)


# ------------------------------------------------------------------------ serving: the server's chat prompt
def _chat_messages(msgs):
    from dsv3.serving.app import ChatMessage

    return [ChatMessage(**m) for m in msgs]


def test_server_renders_deepseek_v3_by_default(tmp_path):
    import torch

    from dsv3 import ModelConfig, Transformer
    from dsv3.checkpoint import save_pretrained
    from dsv3.inference import LLM
    from dsv3.serving import load_state
    from dsv3.serving.app import APIError

    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("debug")
    text = (resources.files("dsv3.data") / "tinyshakespeare.txt").read_text()[:30_000]
    tok = Tokenizer.train([text], cfg.vocab_size)
    model = Transformer(cfg)
    state = load_state(LLM(model, tokenizer=tok, max_seq_len=256, dtype="fp32"))
    assert state.chat_template == DEEPSEEK_V3_CHAT_TEMPLATE
    msgs = CONVERSATIONS["multi_turn"]
    ids = state.chat_ids(_chat_messages(msgs))
    assert ids == encode_chat(tok, msgs, add_generation_prompt=True)[0]
    assert tok.decode(ids) == render(msgs, add_generation_prompt=True)
    assert ids.count(tok.bos_id) == 1 and ids[0] == tok.bos_id  # BOS from the template, not added twice
    # tool calls pass through; a developer message is a system prompt
    tools = CONVERSATIONS["tool_call_with_content"]
    assert tok.decode(state.chat_ids(_chat_messages(tools))) == render(tools, add_generation_prompt=True)
    dev = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert tok.decode(state.chat_ids(_chat_messages(dev))).startswith(f"{tok.bos_token}Be brief.<｜User｜>Hi")
    with pytest.raises(APIError, match="chat template failed.*function"):
        state.chat_ids(_chat_messages([{"role": "assistant", "content": "x", "tool_calls": [{"id": 1}]}]))

    # `dsv3 serve --model DIR`: the exported directory carries the template; its own template wins
    save_pretrained(model, tmp_path / "m", dtype=torch.float32, tokenizer=tok)
    from_dir = load_state(tmp_path / "m", max_seq_len=256, dtype="fp32")
    assert from_dir.chat_template == DEEPSEEK_V3_CHAT_TEMPLATE
    assert from_dir.chat_ids(_chat_messages(msgs)) == ids
    (tmp_path / "m" / "chat_template.jinja").write_text("{{ bos_token }}{{ messages[-1]['content'] }}")
    own = load_state(tmp_path / "m", max_seq_len=256, dtype="fp32")
    assert own.chat_ids(_chat_messages(msgs)) == [tok.bos_id, *tok.encode("e")]
