"""The package is typed: py.typed is shipped and the _native stubs match the native module."""

from __future__ import annotations

import ast
from importlib import resources

import iocpnative
from iocpnative import _native


def stub_tree() -> ast.Module:
    return ast.parse(resources.files("iocpnative").joinpath("_native.pyi").read_text())


def test_py_typed_is_shipped() -> None:
    assert resources.files("iocpnative").joinpath("py.typed").is_file()


def test_stub_names_match_the_native_module() -> None:
    tree = stub_tree()
    top = {n.name for n in tree.body if isinstance(n, ast.FunctionDef | ast.ClassDef)} | {
        n.target.id for n in tree.body if isinstance(n, ast.AnnAssign)
    }  # type: ignore[union-attr]
    native = {name for name in dir(_native) if not name.startswith("_")} | {"__version__"}
    assert top == native
    for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
        members = {
            m.name if isinstance(m, ast.FunctionDef) else m.target.id  # type: ignore[union-attr]
            for m in cls.body
            if isinstance(m, ast.FunctionDef | ast.AnnAssign)
        } - {"__init__"}
        runtime = {name for name in dir(getattr(_native, cls.name)) if not name.startswith("_")}
        assert members == runtime, cls.name


def test_public_names_are_exported() -> None:
    for name in iocpnative.__all__:
        assert hasattr(iocpnative, name), name
