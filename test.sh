#!/usr/bin/env bash
# Runs the test suite: the same bootstrap as launch.sh, then pytest (CPU, gloo).
# Extra arguments go to pytest, e.g. ./test.sh -m slow  or  ./test.sh tests/test_config.py
set -euo pipefail
cd "$(dirname "$0")"
source tools/env.sh
megalite_env
exec python -m pytest -q "$@"
