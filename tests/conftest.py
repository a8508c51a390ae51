"""Shared pytest set-up: run from the repo root so relative paths resolve; `slow` marker."""

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def pytest_configure(config):
    os.chdir(ROOT)
    config.addinivalue_line("markers", "slow: long tests left out of the default run (-m slow)")
