"""Distributed tests run gloo process groups on 127.0.0.1 (dsv3.parallel.launch.run_local)."""

import pytest
import torch.distributed as dist


def pytest_collection_modifyitems(config, items):
    if dist.is_available() and dist.is_gloo_available():
        return
    skip = pytest.mark.skip(reason="torch.distributed with gloo is not available")
    for item in items:
        if "tests/distributed" in str(item.fspath):
            item.add_marker(skip)
