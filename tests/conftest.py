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
