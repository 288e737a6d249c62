"""The package runs on Python 3.10, as ``requires-python`` says (issue 11 item 9).

CI runs the whole suite on Python 3.10 too (``.ci/run``: pyenv's 3.10 build on the CI
image, without torch). These tests also check the source statically, on any Python: it
parses with 3.10's grammar and calls none of the 3.11+ APIs, which a 3.10 run of the
suite finds only where a test reaches the code.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest

import edcache

SRC = os.path.dirname(os.path.abspath(edcache.__file__))  # the package under test

# Names added to the standard library in 3.11 or later that code here could plausibly use.
ATTRIBUTES_311 = {"add_note", "file_digest", "TaskGroup", "StrEnum", "exp2", "cbrt", "getbufferproc"}
NAMES_311 = {"ExceptionGroup", "BaseExceptionGroup", "tomllib", "Self", "LiteralString", "Never",
             "assert_never", "reveal_type", "NotRequired", "Required", "TypeVarTuple", "Unpack",
             "dataclass_transform", "assert_type", "UTC", "chdir"}


def _sources():
    for folder, _dirs, files in os.walk(SRC):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                with open(path, encoding="utf-8") as f:
                    yield os.path.relpath(path, SRC), f.read()


def test_sources_parse_with_python_310_grammar():
    for rel, text in _sources():
        ast.parse(text, filename=rel, feature_version=(3, 10))  # e.g. except* fails here


def test_no_python_311_apis():
    found = []
    for rel, text in _sources():
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Attribute) and node.attr in ATTRIBUTES_311:
                if node.attr == "add_note" and _guarded(text, node):
                    continue
                found.append(f"{rel}:{node.lineno}: .{node.attr}")
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                found += [f"{rel}:{node.lineno}: import {n}" for n in names if n.split(".")[-1] in NAMES_311]
            elif isinstance(node, ast.Name) and node.id in {"ExceptionGroup", "BaseExceptionGroup"}:
                found.append(f"{rel}:{node.lineno}: {node.id}")
    assert not found, "3.11+ APIs in a package that declares Python >= 3.10:\n" + "\n".join(found)


def _guarded(text: str, node: ast.Attribute) -> bool:
    """``exc.add_note(...)`` right under ``if hasattr(exc, "add_note"):`` is fine."""
    lines = text.splitlines()
    return 'hasattr(' in lines[node.lineno - 2] and '"add_note"' in lines[node.lineno - 2]


def test_worker_error_note_without_add_note():
    from edcache.distributed.executor import add_note
    from edcache.errors import CodecError

    class Py310CodecError(CodecError):  # what an exception looks like on 3.10
        @property
        def add_note(self):
            raise AttributeError("add_note")

    exc = Py310CodecError("example 3: cannot be encoded")
    add_note(exc, "Traceback in the worker:\n...")
    assert exc.__notes__ == ["Traceback in the worker:\n..."]
    exc2 = CodecError("x")
    add_note(exc2, "n")
    assert exc2.__notes__ == ["n"]


def test_vermin_finds_no_api_newer_than_python_310():
    pytest.importorskip("vermin", reason="vermin (test extra) is not installed")
    proc = subprocess.run(
        [sys.executable, "-c", "import sys, vermin; sys.argv[0] = 'vermin'; sys.exit(vermin.main())",
         "--target=3.10-", "--violations", "--no-tips",
         "--eval-annotations", "--backport", "typing_extensions", SRC],
        capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
