"""The private Transformers API vr-hf touches is the list in `vr_hf.transformers_private_api`, and all of it is still
there in the installed Transformers."""

import ast
import importlib
import inspect
from pathlib import Path

import pytest
import torch
import transformers
from transformers import CompileConfig, GenerationMixin, PreTrainedConfig, PreTrainedModel, ProcessorMixin

from vr_hf.transformers_private_api import PRIVATE_API


ROOT = Path(__file__).parents[1]
SOURCES = [
    path
    for folder in ("modeling", "src", "tests", "conversion", "examples", "benchmarks")
    for path in sorted((ROOT / folder).rglob("*.py"))
]
TRANSFORMERS_CLASSES = (PreTrainedModel, GenerationMixin, PreTrainedConfig, ProcessorMixin, CompileConfig)


def owner(use):
    try:
        return importlib.import_module(use.owner)
    except ImportError:
        module, _, name = use.owner.rpartition(".")
        return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize("use", PRIVATE_API, ids=lambda use: use.name)
def test_each_private_use_is_still_there(use):
    changed = f"Transformers {transformers.__version__} changed {use.owner}.{use.name} ({use.where}: {use.reason})"
    assert hasattr(owner(use), use.name), f"{changed}: it is gone."
    if use.parameters is not None:
        found = inspect.signature(getattr(owner(use), use.name)).parameters
        missing = [name for name in use.parameters if name not in found]
        assert not missing, f"{changed}: its parameters {missing} are gone (it takes {list(found)})."


def private_names_used() -> dict[str, list[str]]:
    """Each `_name` the project's code reads, calls or defines as a method, with where."""
    used = {}
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            name = getattr(node, "attr", None) if isinstance(node, ast.Attribute) else None
            if isinstance(node, ast.FunctionDef):
                name = node.name
            if name and name.startswith("_") and not name.startswith("__"):
                used.setdefault(name, []).append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return used


def test_every_private_transformers_name_the_project_uses_is_listed():
    """A private name the project uses that one of Transformers' base classes has (and `torch.nn.Module` has not) is
    Transformers' private API."""
    listed = {use.name for use in PRIVATE_API}
    unlisted = {
        name: places
        for name, places in private_names_used().items()
        if name not in listed
        and not hasattr(torch.nn.Module, name)
        and any(hasattr(base, name) for base in TRANSFORMERS_CLASSES)
    }
    assert not unlisted, f"private Transformers API used but not listed in vr_hf.transformers_private_api: {unlisted}"


def test_the_list_names_only_what_the_project_uses():
    used = private_names_used()
    assert not [use.name for use in PRIVATE_API if use.name.startswith("_") and use.name not in used]
