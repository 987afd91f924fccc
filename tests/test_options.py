"""The options object and the entry points that take their names from it; the layout's
import graph."""
import ast
import inspect
from dataclasses import FrozenInstanceError, fields
from pathlib import Path

import pytest
import torch

import sftkey
from sftkey import reference
from sftkey.backends.torch import TorchBackend
from sftkey.distributed import vocab_parallel_linear_cross_entropy
from sftkey.integrations.transformers import LOSS_OPTIONS
from sftkey.options import HeadOptions, LossOptions

from conftest import DEVICE, assert_close, make_head

PACKAGE = Path(sftkey.__file__).parent


def _keyword_names(fn) -> list:
    return [p.name for p in inspect.signature(fn).parameters.values() if p.kind is p.KEYWORD_ONLY]


def test_signatures_list_every_option_with_its_default():
    sig = inspect.signature(sftkey.linear_cross_entropy)
    for f in fields(LossOptions):
        assert sig.parameters[f.name].default == f.default, f.name
    assert set(LossOptions.names()) <= set(_keyword_names(sftkey.linear_cross_entropy))
    assert set(HeadOptions.names()) <= set(_keyword_names(sftkey.logit_stats))
    assert set(LossOptions.names()) <= set(_keyword_names(vocab_parallel_linear_cross_entropy))
    assert set(LossOptions.names()) <= set(inspect.signature(sftkey.LinearCrossEntropyLoss).parameters)


def test_the_oracle_has_the_same_options():
    """The oracle's signatures come from the options' declaration: the same names."""
    assert set(_keyword_names(reference.linear_cross_entropy)) == {"bias", *LossOptions.names()}
    assert set(_keyword_names(reference.logit_stats)) == {"bias", "topk", *HeadOptions.names()}


def test_use_fused_loss_options_come_from_the_options_object():
    assert set(LOSS_OPTIONS) <= set(LossOptions.names())
    assert {"token_weights", "dft", "ignore_index", "backend"} <= set(LOSS_OPTIONS)


def test_options_are_frozen_validated_once_and_overridable():
    opts = LossOptions(label_smoothing=0.1, reduction="sum")
    with pytest.raises(FrozenInstanceError):
        opts.reduction = "mean"
    with pytest.raises(ValueError, match="label_smoothing"):
        LossOptions(label_smoothing=2.0)
    with pytest.raises(TypeError, match="unexpected keyword arguments \\['label_smothing'\\]"):
        sftkey.linear_cross_entropy(torch.zeros(2, 4), torch.zeros(3, 4), torch.zeros(2, dtype=torch.long),
                                    label_smothing=0.1)
    with pytest.raises(TypeError, match="options must be a LossOptions"):
        sftkey.linear_cross_entropy(torch.zeros(2, 4), torch.zeros(3, 4), torch.zeros(2, dtype=torch.long),
                                    options={"reduction": "sum"})


def test_options_object_and_keywords_agree():
    x, w, _, y = make_head(9, 16, 23, torch.float32, seed=2)
    opts = LossOptions(label_smoothing=0.1, entropy_weights=0.2, reduction="sum", backend="torch")
    by_object = sftkey.linear_cross_entropy(x, w, y, options=opts)
    by_keywords = sftkey.linear_cross_entropy(x, w, y, label_smoothing=0.1, entropy_weights=0.2, reduction="sum",
                                              backend="torch")
    assert torch.equal(by_object, by_keywords)
    overridden = sftkey.linear_cross_entropy(x, w, y, options=opts, reduction="mean")
    assert_close(overridden * (y != -100).sum(), by_keywords.detach(), torch.float32, "reduction overridden")


def test_backend_may_be_an_instance():
    x, w, _, y = make_head(9, 16, 23, torch.float32, seed=3)
    by_name = sftkey.linear_cross_entropy(x, w, y, backend="torch")
    by_instance = sftkey.linear_cross_entropy(x, w, y, backend=TorchBackend())
    assert torch.equal(by_name, by_instance)
    with pytest.raises(TypeError, match="backend must be a name or a sftkey Backend"):
        sftkey.linear_cross_entropy(x, w, y, backend=object())


def test_module_options_per_call():
    x, w, _, y = make_head(9, 16, 23, torch.float32, seed=4)
    module = sftkey.LinearCrossEntropyLoss(reduction="sum", backend="torch")
    tw = torch.rand(9, device=DEVICE)
    want = sftkey.linear_cross_entropy(x, w, y, reduction="sum", token_weights=tw, backend="torch")
    assert torch.equal(module(x, w, y, token_weights=tw), want)
    assert "reduction='sum'" in repr(module)


def _module_imports(path: Path) -> set:
    """The sftkey modules ``path`` imports at module level (not inside functions)."""
    name = "sftkey." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
    name = name.removesuffix(".__init__")
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            if base.startswith("sftkey"):
                if not (name + ".").startswith(base + "."):  # an ancestor package is imported already
                    found.add(base)
                found.update(f"{base}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("sftkey"))
    return found


def test_no_import_cycles():
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        name = ("sftkey." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__")
        modules[name] = path
    graph = {name: {m for m in _module_imports(path) if m in modules and m != name} for name, path in modules.items()}
    seen, stack = set(), []

    def visit(node):
        if node in stack:
            raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(node):] + [node]))
        if node in seen:
            return
        stack.append(node)
        for nxt in graph[node]:
            visit(nxt)
        stack.pop()
        seen.add(node)

    for node in graph:
        visit(node)


def test_the_oracle_imports_nothing_it_checks():
    """The oracle imports the result types and the options' declaration (names, defaults,
    checks), nothing that computes."""
    imported = _module_imports(PACKAGE / "reference.py")
    allowed = {"sftkey.results", "sftkey.options"}
    assert {name.rsplit(".", 1)[0] if name.rsplit(".", 1)[0] in allowed else name for name in imported} <= allowed, \
        imported
