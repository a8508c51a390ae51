"""Shared pytest set-up: run from the repo root so relative paths resolve; `slow` marker;
MEGALITE_TEST_THREADS (if set) also sets this process's intra-op threads; `cache`, the
prepared default corpus of the parity config (tests/parity.py), made once per session
(a module may define its own `cache` for another vocabulary); `launch_cache` and
`launch_reference`, the corpus and the uninterrupted losses of the tiny 2-rank run that
tests launch through ./launch.sh (tests/launching.py)."""

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


@pytest.fixture(scope="session")
def launch_cache(tmp_path_factory):
    """The prepared corpus of the tiny config the tests launch through ./launch.sh."""
    from parity import prepared_cache
    from test_train import tiny_args
    return prepared_cache(tmp_path_factory, "launch_data", tiny_args)


@pytest.fixture(scope="session")
def launch_reference(launch_cache, tmp_path_factory):
    """The losses of the tiny 2-rank run, uninterrupted, through ./launch.sh."""
    from launching import Launch, launch_args
    from test_train import losses
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    run = Launch(launch_args(launch_cache, run_dir))
    assert run.finish() == 0, run.output
    return losses(run_dir)
