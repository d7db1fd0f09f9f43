"""Both engines implement `EngineProtocol`, the interface the server types against, and the dsv3
tokenizer implements `TokenizerProtocol`: every member the server reads is declared, none is probed."""

from __future__ import annotations

import inspect

import torch

from dsv3.config import ModelConfig
from dsv3.inference import Engine, EngineProtocol, TokenizerProtocol
from dsv3.inference.disagg import DisaggEngine
from dsv3.model import Transformer
from dsv3.tokenizer import Tokenizer

METHODS = [
    "encode",
    "add_request",
    "abort",
    "step",
    "has_unfinished",
    "num_running",
    "num_waiting",
    "expert_load",
    "close",
]


def test_protocol_members():
    """The method list above is the protocol's (a member added there must be added to both engines)."""
    declared = {n for n, v in vars(EngineProtocol).items() if inspect.isfunction(v) and not n.startswith("_")}
    assert declared == set(METHODS)


def test_engine_implements_the_protocol():
    torch.manual_seed(0)
    engine = Engine(Transformer(ModelConfig.from_preset("debug")).eval(), max_batch_size=2, max_seq_len=32)
    assert isinstance(engine, EngineProtocol)
    assert engine.num_waiting() == 0 and engine.num_running() == 0
    assert engine.expert_load() is None
    engine.add_request("a", [5, 6, 7])
    assert engine.num_waiting() == 1
    engine.close()  # nothing to release; still callable


def test_disaggregated_engine_has_the_protocol_methods():
    """Starting workers is the integration test's job; here: the methods with the protocol's parameters."""
    for name in METHODS:
        ours = inspect.signature(getattr(DisaggEngine, name))
        proto = inspect.signature(getattr(EngineProtocol, name))
        assert list(proto.parameters) == list(ours.parameters)[: len(proto.parameters)], name


def test_tokenizer_implements_the_protocol():
    tok = Tokenizer.train(["hello world " * 20], vocab_size=300)
    assert isinstance(tok, TokenizerProtocol)
    assert isinstance(tok.bos_id, int) and isinstance(tok.eos_id, int)
