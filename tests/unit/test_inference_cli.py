"""`dsv3 generate` on an HF directory written by save_pretrained (with its tokenizer)."""

import io
from importlib import resources

import pytest
import torch

from dsv3 import ModelConfig, Transformer
from dsv3.checkpoint import save_pretrained
from dsv3.cli import main
from dsv3.inference import LLM, SamplingParams
from dsv3.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("debug")
    text = (resources.files("dsv3.data") / "tinyshakespeare.txt").read_text()[:20000]
    tok = Tokenizer.train([text], cfg.vocab_size)
    path = tmp_path_factory.mktemp("gen") / "model"
    save_pretrained(Transformer(cfg), path, dtype=torch.float32, tokenizer=tok)
    return path


def test_generate_streams_prompt_and_continuation(ckpt, capsys):
    args = [
        "generate",
        "--checkpoint",
        str(ckpt),
        "--prompt",
        "ROMEO:",
        "--max-new-tokens",
        "8",
        "--temperature",
        "0",
    ]
    assert main(args) == 0
    out, err = capsys.readouterr()
    llm = LLM(ckpt, dtype="float32")
    ref = llm.generate("ROMEO:", SamplingParams(max_new_tokens=8, temperature=0))[0]
    assert ref.prompt_token_ids[0] == llm.tokenizer.bos_id
    assert out == "ROMEO:" + ref.text + "\n"
    assert "tok/s" in err and "ttft" in err
    assert main(args + ["--speculative"]) == 0
    out2, err2 = capsys.readouterr()
    assert out2 == out and "MTP acceptance" in err2


def test_generate_batch_and_interactive(ckpt, capsys, monkeypatch):
    base = ["generate", "--checkpoint", str(ckpt), "--max-new-tokens", "4", "--seed", "3", "--top-k", "20"]
    assert main(base + ["--prompt", "a", "--prompt", "bb"]) == 0
    out, _ = capsys.readouterr()
    assert out.count("=== ") == 2
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n/reset\n\nworld\n/quit\n"))
    assert main(base + ["--interactive", "--max-seq-len", "32"]) == 0
    out, err = capsys.readouterr()
    assert out.count("> ") == 5 and err.count("finish:") == 2


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--prompt", "x", "--top-p", "0"], "top_p"),
        (["--prompt", "x", "--max-new-tokens", "0"], "max_new_tokens"),
        ([], "--prompt"),
        (["--prompt", "x" * 200, "--max-seq-len", "16"], "max_seq_len"),
    ],
)
def test_bad_arguments_exit_cleanly(ckpt, capsys, extra, match):
    assert main(["generate", "--checkpoint", str(ckpt), *extra]) == 2
    assert match in capsys.readouterr().err


def test_missing_checkpoint(tmp_path, capsys):
    assert main(["generate", "--checkpoint", str(tmp_path / "nope"), "--prompt", "x"]) == 2
    assert "does not exist" in capsys.readouterr().err
