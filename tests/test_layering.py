"""The layers, read from every import statement (lazy ones inside functions included):

* ``pipeline/`` (messages, transport, algorithm, settings) imports none of the other layers and
  no heavy library (torch, vLLM, DeepSpeed, transformers);
* ``workers/`` (samplers) and ``learner/`` do not import each other;
* none of them imports the toy kit (``toy/``); no product code imports ``bench``.

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


def imported_modules(path: Path) -> set[str]:
    """Top-level names of every module ``path`` imports, anywhere in the file."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            names.add(node.args[0].value.split(".")[0])
    return names


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
        f for pkg in FORBIDDEN for p in sorted((ROOT / pkg).glob("*.py")) for f in long_functions(p)
    ]
    assert found == [], found


def test_the_length_rule_can_fail(tmp_path: Path) -> None:
    body = "\n".join(f"    x{i} = {i}" for i in range(70))
    (tmp_path / "flat.py").write_text(f"def f():\n{body}\n")
    (tmp_path / "long.py").write_text(f"def f():\n{body}\n    if x1:\n        return x1\n")
    assert long_functions(tmp_path / "flat.py") == []
    assert [f.split(" ")[1] for f in long_functions(tmp_path / "long.py")] == ["f"]


def test_only_the_transport_touches_the_redis_client() -> None:
    """Every Redis call the processes make goes through ``pipeline.streams.Streams`` (retries,
    stop handling, dead letters): no other product file reads a ``.client`` attribute."""
    found = []
    for pkg in FORBIDDEN:
        for path in sorted((ROOT / pkg).glob("*.py")):
            if path == ROOT / "pipeline" / "streams.py":
                continue
            tree = ast.parse(path.read_text(), str(path))
            found += [
                f"{path.relative_to(ROOT)}:{node.lineno}"
                for node in ast.walk(tree)
                if isinstance(node, ast.Attribute) and node.attr == "client"
            ]
    assert found == [], found
