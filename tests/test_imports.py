"""The arrows between the parts of megalite (../shared/DESIGN.md, "Layout"), read from the code.

Every module's imports, those inside functions included, are read with `ast`, and each
is checked against the rules:
- model/ may use parallel/'s layers, but imports nothing from training/, checkpoint/
  or tools/;
- parallel/ knows no model: it imports nothing from model/ (nor training/, checkpoint/);
- optim/ imports nothing from training/ or model/;
- kernels/ are standalone ops: nothing of megalite;
- nothing in megalite/ imports tools/;
- no module imports another module's private (underscore) names;
- only parallel/comm.py calls torch.distributed (start-up may init the process group).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# (folder whose modules are checked, module prefixes they must not import)
RULES = [
    ("megalite/model", ("megalite.training", "megalite.checkpoint", "tools")),
    ("megalite/parallel", ("megalite.model", "megalite.training", "megalite.checkpoint")),
    ("megalite/optim", ("megalite.training", "megalite.model")),
    ("kernels", ("megalite",)),
    ("megalite", ("tools",)),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, package: str | None = None) -> list[tuple[int, str]]:
    """(line, module) for every import in the file, relative ones made absolute against
    `package` (default: the file's own); for `from package import name` both `package`
    and `package.name` (name may be a module)."""
    if package is None:
        package = module_name(path)
        if path.name != "__init__.py":
            package = package.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            found.append((node.lineno, base))
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return found


def violations(folder: str, forbidden: tuple[str, ...]) -> list[str]:
    out = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        for line, module in imported_modules(path):
            if any(module == f or module.startswith(f + ".") for f in forbidden):
                out.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    return out


@pytest.mark.parametrize("folder, forbidden", RULES, ids=[r[0] for r in RULES])
def test_parts_import_only_what_the_design_allows(folder, forbidden):
    found = violations(folder, forbidden)
    assert not found, "imports the design forbids:\n" + "\n".join(found)


def test_the_checker_sees_imports_inside_functions(tmp_path):
    module = tmp_path / "mod.py"
    module.write_text("import os\n\ndef f():\n    from ..training import trainer\n")
    found = imported_modules(module, package="megalite.model")
    assert (4, "megalite.training.trainer") in found


def test_no_module_imports_another_modules_private_names():
    """A name with a leading underscore stays in its module: callers use the public API of
    the module that owns it."""
    found = []
    for path in sorted((ROOT / "megalite").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("megalite"):
                found += [f"{path.relative_to(ROOT)}:{node.lineno} imports {node.module}."
                          f"{a.name}" for a in node.names if a.name.startswith("_")]
    assert not found, "\n".join(found)


def test_only_comm_calls_torch_distributed():
    """parallel/comm.py is the one place that calls torch.distributed (so device checks,
    counters, timeouts and error messages are in one place); parallel/torchrun.py runs
    torchrun itself; kernels/ take the reduction they need as a callable."""
    allowed = {"megalite/parallel/comm.py": None,
               "megalite/parallel/comm_failure.py": None,  # comm.py's failure reports
               # launch.sh's torchrun: the stock launcher with megalite's signal rules
               "megalite/parallel/torchrun.py": {"main", "SignalException", "ChildFailedError",
                                                 "_terminate_process_handler",
                                                 "LocalElasticAgent"}}
    found = []
    for path in sorted([*(ROOT / "megalite").rglob("*.py"), *(ROOT / "kernels").rglob("*.py")]):
        rel = str(path.relative_to(ROOT))
        tree = ast.parse(path.read_text(), rel)
        aliases = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                aliases |= {a.asname or a.name for a in node.names
                            if a.name.startswith("torch.distributed")}
            elif isinstance(node, ast.ImportFrom) and \
                    (node.module or "").startswith("torch.distributed"):
                found.append(f"{rel}:{node.lineno} imports from {node.module}")
        if rel in allowed and allowed[rel] is None:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute):
                chain = ast.unparse(node.value)
                if chain in aliases or chain == "torch.distributed":
                    if node.attr not in (allowed.get(rel) or set()):
                        found.append(f"{rel}:{node.lineno} calls {chain}.{node.attr}")
    assert not found, "torch.distributed outside parallel/comm.py:\n" + "\n".join(found)
