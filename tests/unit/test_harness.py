"""The lm_eval adapter (dsv3.tasks.harness.DSV3LM) against a plain forward of the reference model."""

from __future__ import annotations

import copy
import subprocess
import sys
from importlib import resources
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("lm_eval")

from lm_eval.api.registry import get_model  # noqa: E402

from dsv3 import ModelConfig, Transformer  # noqa: E402
from dsv3.checkpoint import save_pretrained  # noqa: E402
from dsv3.cli import main  # noqa: E402
from dsv3.inference import LLM  # noqa: E402
from dsv3.tasks.harness import DSV3LM  # noqa: E402
from dsv3.tasks.harness_eval import HarnessConfig  # noqa: E402
from dsv3.tokenizer import Tokenizer  # noqa: E402

TEXT = (resources.files("dsv3.data") / "tinyshakespeare.txt").read_text()[:30000]
MAX_SEQ = 48


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("debug")
    tok = Tokenizer.train([TEXT], cfg.vocab_size)
    model = Transformer(cfg).eval()
    ref = copy.deepcopy(model)  # the engine swaps CPU speed paths into its own copy
    llm = LLM(model, tokenizer=tok, max_batch_size=4, max_seq_len=MAX_SEQ, dtype="fp32")
    return DSV3LM(llm, batch_size=4), ref, tok


def req(*args):
    return SimpleNamespace(args=args)


@torch.no_grad()
def ref_logprobs(model: Transformer, ids: list[int]) -> torch.Tensor:
    """[len(ids) - 1, V] log-softmax predicting ids[1:] from a plain full forward."""
    logits = model(torch.tensor([ids]), with_mtp=False).logits[0].double()
    return logits[:-1].log_softmax(-1)


def ref_score(model: Transformer, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    lp = ref_logprobs(model, ctx + cont)[len(ctx) - 1 :]
    target = torch.tensor(cont)
    return float(lp.gather(1, target[:, None]).sum()), bool((lp.argmax(-1) == target).all())


def test_loglikelihood_equals_reference_forward(setup):
    lm, ref, tok = setup
    cases = [
        ("To be, or not to be", " that is the question"),
        ("First Citizen:\nBefore we proceed ", "any further, hear me speak."),  # space moves over
        ("", "All: Speak, speak."),  # empty context: BOS
        ("Romeo", "!"),
    ]
    got = lm.loglikelihood([req(c, x) for c, x in cases])
    for (ctx, cont), (lp, greedy) in zip(cases, got):
        if ctx:
            stripped = ctx.rstrip()  # lm_eval moves trailing context spaces to the continuation
            ctx, cont = stripped, ctx[len(stripped) :] + cont
            whole = tok.encode(ctx + cont)
            c_ids = tok.encode(ctx)
            want = ref_score(ref, c_ids, whole[len(c_ids) :])
        else:
            want = ref_score(ref, [tok.bos_id], tok.encode(cont))
        assert abs(lp - want[0]) <= 1e-4, (ctx, cont, lp, want)
        assert greedy == want[1]
        assert lp < 0


def test_is_greedy_true_for_the_argmax_continuation(setup):
    lm, ref, tok = setup
    ctx = tok.encode("Citizen: We are accounted poor citizens")
    lp = ref_logprobs(ref, ctx + [0])[-1]
    best = int(lp.argmax())
    worst = int(lp.argmin())
    (_, g1), (_, g2) = lm._loglikelihood_tokens([(("", ""), ctx, [best]), (("", ""), ctx, [worst])])
    assert g1 and not g2


def test_long_context_keeps_its_end(setup):
    lm, ref, tok = setup
    ctx = tok.encode(TEXT[:2000])
    cont = tok.encode(" the end")
    assert len(ctx) > MAX_SEQ
    ((lp, _),) = lm._loglikelihood_tokens([(("", ""), ctx, cont)])
    kept = (ctx + cont)[-(MAX_SEQ - 1) :]
    want, _ = ref_score(ref, kept[: -len(cont)], cont)
    assert abs(lp - want) <= 1e-4


def test_loglikelihood_rolling_windows(setup):
    """Short text: one window = BOS + text. Long text: every token scored once, each window conditioned
    on the M tokens before its last token (lm_eval's rolling windows), M = the longest prompt - 1."""
    lm, ref, tok = setup
    short, long = "Good morrow, cousin.", TEXT[:600]
    got_short, got_long = lm.loglikelihood_rolling([req(short), req(long)])
    ids = [tok.bos_id, *tok.encode(short)]
    want_short = float(ref_logprobs(ref, ids).gather(1, torch.tensor(ids[1:])[:, None]).sum())
    assert abs(got_short - want_short) <= 1e-4
    full = [tok.bos_id, *tok.encode(long)]
    n, M = len(full) - 1, MAX_SEQ - 2
    assert n > 3 * M
    want = 0.0
    for s in range(0, n, M):
        L = min(M, n - s)
        window = full[: s + L + 1] if s == 0 else full[s + L - M : s + L + 1]
        lp = ref_logprobs(ref, window)[-L:]
        want += float(lp.gather(1, torch.tensor(window[-L:])[:, None]).sum())
    assert abs(got_long - want) <= 1e-3


@torch.no_grad()
def test_generate_until_equals_greedy_reference(setup):
    lm, ref, tok = setup
    prompts = ["First Citizen:\n", "To be, or"]
    kw = {"until": ["\n", "."], "max_gen_toks": 10, "do_sample": False}
    got = lm.generate_until([req(p, dict(kw)) for p in prompts])
    for p, text in zip(prompts, got):
        ids = tok.encode(p)
        new: list[int] = []
        for _ in range(10):
            nxt = int(ref(torch.tensor([ids + new]), with_mtp=False).logits[0, -1].argmax())
            if nxt == tok.eos_id:
                break
            new.append(nxt)
            if any(s in tok.decode(new) for s in kw["until"]):
                break
        want = tok.decode(new)
        for s in kw["until"]:
            want = want.split(s)[0]
        assert text == want
    with pytest.raises(ValueError, match="repetition_penalty"):
        lm.generate_until([req("x", {"until": ["\n"], "repetition_penalty": 1.1})])


def test_registered_and_built_from_a_directory(setup, tmp_path):
    _, ref, tok = setup
    assert get_model("dsv3") is DSV3LM
    assert get_model("local-completions").__name__ == "LocalCompletionsAPI"  # lm_eval's own still load
    save_pretrained(ref, tmp_path / "model", dtype=torch.float32, tokenizer=tok)
    lm = DSV3LM.create_from_arg_string(f"pretrained={tmp_path},batch_size=2,max_length=64", {"device": "cpu"})
    assert lm.batch_size == 2 and lm.max_length == 63 and lm.prefix_token_id == tok.bos_id
    with pytest.raises(ValueError, match="batch_size"):
        DSV3LM(lm.llm, batch_size="zero")


def test_unknown_task_named_with_the_places_searched(tmp_path, capsys):
    with pytest.raises(ValueError, match="include-path"):
        HarnessConfig(tasks=["x"], include_path=str(tmp_path / "missing")).validate()
    # the CLI checks the names before loading anything: the checkpoint does not even exist
    argv = ["eval", "--checkpoint", str(tmp_path / "none"), "--tasks", "arc_easy,no_such_task"]
    assert main([*argv, "--include-path", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "unknown lm_eval task(s) ['no_such_task']: looked in" in err and str(tmp_path) in err
    assert main(["eval", "--checkpoint", str(tmp_path / "none")]) == 2
    assert "--tasks LIST" in capsys.readouterr().err


def test_import_dsv3_never_needs_lm_eval():
    code = "import sys, dsv3, dsv3.tasks, dsv3.tasks.evaluate, dsv3.cli; assert 'lm_eval' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_unknown_model_argument_is_an_error():
    with pytest.raises(TypeError, match="pretraind"):
        DSV3LM.create_from_arg_string("pretraind=x", {"batch_size": 1, "max_batch_size": 4})
