"""Shared pytest set-up: run from the repo root so relative paths resolve; `slow` marker;
MEGALITE_TEST_THREADS (if set) also sets this process's intra-op threads; `cache`, the
prepared default corpus of the parity config (tests/parity.py), made once per session
(a module may define its own `cache` for another vocabulary)."""

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def pytest_configure(config):
    os.chdir(ROOT)
    if "MEGALITE_TEST_THREADS" in os.environ:
        import torch
        torch.set_num_threads(int(os.environ["MEGALITE_TEST_THREADS"]))
    config.addinivalue_line("markers", "slow: long tests left out of the default run (-m slow)")


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    from parity import prepared_cache
    return prepared_cache(tmp_path_factory, "parity_data")
