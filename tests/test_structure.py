"""The layout's promises: one default call crosses few of the package's files, and no module
reaches into another's private names."""
import ast
import sys
from pathlib import Path

import torch

import sftkey

PACKAGE = Path(sftkey.__file__).resolve().parent
#: api -> options -> inputs -> driver -> loss -> engine -> torch backend -> products
MAX_FILES = 8


def _files_entered(fn) -> set:
    """The package's files whose Python functions ``fn()`` enters."""
    entered = set()

    def profile(frame, event, arg):
        if event == "call":
            path = Path(frame.f_code.co_filename)
            if path.is_absolute() and path.resolve().is_relative_to(PACKAGE):
                entered.add(path.resolve().relative_to(PACKAGE).as_posix())

    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return entered


def test_a_default_call_enters_few_files():
    """``linear_cross_entropy(h, W, y)`` forward and backward on the CPU (after a first call,
    which may set things up once), traced with ``sys.setprofile``."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(64, 32, generator=g, requires_grad=True)
    w = torch.randn(300, 32, generator=g, requires_grad=True)
    y = torch.randint(0, 300, (64,), generator=g)

    def call():
        sftkey.linear_cross_entropy(h, w, y).backward()

    call()
    entered = _files_entered(call)
    assert len(entered) <= MAX_FILES, sorted(entered)
    assert {"api.py", "core/driver.py", "backends/engine.py"} <= entered, sorted(entered)


def test_no_module_imports_a_private_name_of_another():
    found = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("sftkey")):
                found += [f"{path.relative_to(PACKAGE)}: {a.name}" for a in node.names
                          if a.name.startswith("_") and not a.name.endswith("__")]
    assert not found, found
