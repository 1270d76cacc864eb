"""The layers, read from every import statement (lazy ones inside functions included):

* ``pipeline/`` (messages, transport, algorithm, settings) imports none of the other layers and
  no heavy library (torch, vLLM, DeepSpeed, transformers);
* ``workers/`` (samplers) and ``learner/`` do not import each other;
* none of them imports the toy kit (``toy/``); no product code imports ``bench``;
* inside ``pipeline/``: no process module (nor anything in ``pipeline/`` outside the tools)
  imports the command-line tools (``pipeline/cli/``), and the TreePO algorithm
  (``pipeline/treepo/``) imports nothing of the weights (``pipeline/weights/``) or the tools.

A fresh-interpreter check that importing ``pipeline`` loads no heavy library sits in
tests/test_config.py.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HEAVY = {"torch", "vllm", "deepspeed", "transformers"}
FORBIDDEN = {
    "pipeline": {"learner", "workers", "toy", "bench"} | HEAVY,
    "workers": {"learner", "toy", "bench"},
    "learner": {"workers", "toy", "bench"},
    "toy": {"bench"},
}


SUBLAYERS = {
    # folder: (modules it may not import, a folder inside it the rule skips)
    "pipeline": ({"pipeline.cli"}, "pipeline/cli"),
    "workers": ({"pipeline.cli"}, None),
    "learner": ({"pipeline.cli"}, None),
    "pipeline/treepo": ({"pipeline.cli", "pipeline.weights"}, None),
}


def imported_modules(path: Path) -> set[str]:
    """Top-level names of every module ``path`` imports, anywhere in the file."""
    return {name.split(".")[0] for name in imported_names(path)}


def imported_names(path: Path) -> set[str]:
    """Full dotted names of every module ``path`` imports, anywhere in the file (``from a.b
    import c`` counts as ``a.b.c``: ``c`` may be a module)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            names.add(node.args[0].value)
    return names


def sublayer_violations(root: Path) -> dict[str, list[str]]:
    """Files under ``root`` that import what ``SUBLAYERS`` forbids them."""
    bad: dict[str, list[str]] = {}
    for folder, (forbidden, skip) in SUBLAYERS.items():
        for path in sorted((root / folder).rglob("*.py")):
            if skip and path.is_relative_to(root / skip):
                continue
            hits = sorted(
                n
                for n in imported_names(path)
                if any(n == f or n.startswith(f + ".") for f in forbidden)
            )
            if hits:
                bad[str(path.relative_to(root))] = hits
    return bad


def test_processes_and_the_algorithm_import_no_tools_and_the_algorithm_no_weights() -> None:
    assert sublayer_violations(ROOT) == {}


def test_the_sublayer_rule_fails_on_a_planted_import(tmp_path: Path) -> None:
    for folder in ("pipeline/treepo", "pipeline/cli", "workers", "learner"):
        (tmp_path / folder).mkdir(parents=True)
    (tmp_path / "pipeline/treepo/bad.py").write_text("from pipeline.weights import manifest\n")
    (tmp_path / "learner/bad.py").write_text("def f():\n    from pipeline.cli.export import x\n")
    (tmp_path / "pipeline/cli/fine.py").write_text("from pipeline.cli import status\n")
    (tmp_path / "workers/fine.py").write_text("from pipeline.checkpoints import LATEST\n")
    assert sublayer_violations(tmp_path) == {
        "pipeline/treepo/bad.py": ["pipeline.weights", "pipeline.weights.manifest"],
        "learner/bad.py": ["pipeline.cli.export", "pipeline.cli.export.x"],
    }


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_layers_import_only_what_they_may(package: str) -> None:
    bad = {
        str(path.relative_to(ROOT)): sorted(imported_modules(path) & FORBIDDEN[package])
        for path in sorted((ROOT / package).rglob("*.py"))
    }
    bad = {k: v for k, v in bad.items() if v}
    assert not bad, f"{package}/ may not import {sorted(FORBIDDEN[package])}: {bad}"


def test_the_reader_sees_lazy_and_dynamic_imports(tmp_path: Path) -> None:
    src = tmp_path / "m.py"
    src.write_text(
        "import os.path\n"
        "def f():\n"
        "    from torch import nn\n"
        "    import importlib\n"
        "    importlib.import_module('vllm.engine')\n"
        "from . import sibling\n"
    )
    assert imported_modules(src) == {"os", "torch", "importlib", "vllm"}


MAX_FUNCTION_LINES = 60


def long_functions(path: Path) -> list[str]:
    """Functions of ``path`` over ``MAX_FUNCTION_LINES`` lines, except flat declarations (a
    body of assignments and calls, such as a metrics registry; no branches, no nesting)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        length = (node.end_lineno or node.lineno) - node.lineno + 1
        flat = all(
            isinstance(s, (ast.Assign, ast.AnnAssign, ast.Expr))
            or (isinstance(s, ast.For) and all(isinstance(b, ast.Expr) for b in s.body))
            for s in node.body
        )
        if length > MAX_FUNCTION_LINES and not flat:
            found.append(f"{path.name}:{node.lineno} {node.name} ({length} lines)")
    return found


def test_no_long_functions_in_product_code() -> None:
    found = [
        f
        for pkg in FORBIDDEN
        for p in sorted((ROOT / pkg).rglob("*.py"))
        for f in long_functions(p)
    ]
    assert found == [], found


def test_the_length_rule_can_fail(tmp_path: Path) -> None:
    body = "\n".join(f"    x{i} = {i}" for i in range(70))
    (tmp_path / "flat.py").write_text(f"def f():\n{body}\n")
    (tmp_path / "long.py").write_text(f"def f():\n{body}\n    if x1:\n        return x1\n")
    assert long_functions(tmp_path / "flat.py") == []
    assert [f.split(" ")[1] for f in long_functions(tmp_path / "long.py")] == ["f"]


def test_only_the_transport_touches_the_redis_client() -> None:
    """Every Redis call the processes make goes through ``pipeline.wire.streams.Streams`` (retries,
    stop handling, dead letters): no other product file reads a ``.client`` attribute."""
    found = []
    for pkg in FORBIDDEN:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            if path == ROOT / "pipeline" / "wire" / "streams.py":
                continue
            tree = ast.parse(path.read_text(), str(path))
            found += [
                f"{path.relative_to(ROOT)}:{node.lineno}"
                for node in ast.walk(tree)
                if isinstance(node, ast.Attribute) and node.attr == "client"
            ]
    assert found == [], found


PROCESS_FILES = ("workers/sampler.py", "learner/process.py")
MAX_PROCESS_LINES = 320


def test_process_files_stay_wiring() -> None:
    """A process module wires its parts together; what is not wiring lives in modules of its own."""
    sizes = {f: len((ROOT / f).read_text().splitlines()) for f in PROCESS_FILES}
    assert all(n < MAX_PROCESS_LINES for n in sizes.values()), sizes
