"""Run a tool with the project's Python: `python tools/X.py` from any shell works.

./launch.sh and ./test.sh make .venv (tools/env.sh) and use it; a user who then types
`python tools/plot.py ...` usually gets another interpreter, without torch or the
extras. Each tool calls `use_project_python()` before its imports when run as a
script: if .venv exists and this is not its interpreter, the tool starts again under
it with the same arguments. MEGALITE_ANY_PYTHON=1 keeps the interpreter as it is.
"""

import os
import sys
from pathlib import Path

VENV = Path(__file__).resolve().parent.parent / ".venv"


def use_project_python() -> None:
    python = VENV / "bin" / "python"
    if (not python.exists() or os.environ.get("MEGALITE_ANY_PYTHON") == "1"
            or Path(sys.prefix).resolve() == VENV.resolve()):
        return
    os.execv(str(python), [str(python), *sys.argv])
