# Sourced by launch.sh and test.sh: make .venv once, then reuse it.
#
# A torch that the system python can already import is reused (the venv sees system
# site-packages) instead of downloading another; otherwise `pip install torch==2.13.0`
# runs, which on our CPU machines takes the local CPU wheel. Set MEGALITE_TORCH to
# another pip spec (or PIP_INDEX_URL to PyTorch's CPU index) on other machines. The
# optional extras come too (plots, TensorBoard, Parquet and compressed corpora, progress
# bars): the package runs without them, the project's commands and tests use them.
megalite_env() {
  local root venv stamp want py
  root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  venv="$root/.venv"
  stamp="$venv/.megalite-installed"
  want="$(cat "$root/setup.py" | cksum)"
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    py="${PYTHON:-python3}"
    echo "[megalite] setting up $venv (first run only)" >&2
    if [ ! -x "$venv/bin/python" ]; then
      if "$py" -c "import torch" 2>/dev/null; then
        "$py" -m venv --system-site-packages "$venv"
      else
        "$py" -m venv "$venv"
      fi
    fi
    if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
      "$venv/bin/pip" install -q --disable-pip-version-check "${MEGALITE_TORCH:-torch==2.13.0}" || return 1
    fi
    "$venv/bin/pip" install -q --disable-pip-version-check --no-build-isolation -e "$root[dev,viz,data]" || return 1
    echo "$want" > "$stamp"
  fi
  export PATH="$venv/bin:$PATH"
  export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
}
