import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def serve_in_thread():
    """A context manager factory: `with serve_in_thread(state) as base:` runs dsv3's server for a
    `load_state(...)` on a free 127.0.0.1 port in a daemon thread, waits for /health, yields the base URL
    and stops the server on exit."""
    import contextlib
    import socket
    import threading
    import time

    import httpx

    from dsv3.serving import build_server

    @contextlib.contextmanager
    def start(state):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        srv = build_server(state, "127.0.0.1", port, graceful_timeout=5)
        thread = threading.Thread(target=srv.run, daemon=True)
        thread.start()
        base = f"http://127.0.0.1:{port}"
        for _ in range(200):
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.05)
        try:
            yield base
        finally:
            srv.should_exit = True
            thread.join(timeout=10)

    return start


@pytest.fixture(scope="session")
def eos_heavy_debug_model(tmp_path_factory):
    """An HF directory of a random debug-preset model (with a tokenizer that knows `add` prompts) whose
    EOS logit is scaled up: GRPO completions of 1 to 8 tokens, so lengths (and ranks' token counts) vary."""
    from importlib import resources

    from dsv3.checkpoint import save_pretrained
    from dsv3.config import ModelConfig
    from dsv3.model import Transformer
    from dsv3.tokenizer import Tokenizer

    cfg = ModelConfig.from_preset("debug")
    text = (resources.files("dsv3.data") / "tinyshakespeare.txt").read_text()[:5000]
    digits = " ".join(f"What is {a}+{b}? {a + b}" for a in range(10) for b in range(10))
    tok = Tokenizer.train([text, digits], cfg.vocab_size)
    torch.manual_seed(0)
    model = Transformer(cfg)
    with torch.no_grad():
        model.head.weight[tok.eos_id] *= 30
    path = tmp_path_factory.mktemp("eos_heavy") / "model"
    save_pretrained(model, path, dtype=torch.float32, tokenizer=tok)
    return path


@pytest.fixture(scope="session")
def load_benchmark():
    """A factory: `load_benchmark("distill")` imports benchmarks/distill.py as a module (benchmarks are
    scripts, not a package), so a test can call its functions or its `main`."""
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "benchmarks"

    def load(name: str):
        spec = importlib.util.spec_from_file_location(f"{name}_benchmark", root / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load
