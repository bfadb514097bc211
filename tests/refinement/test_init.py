"""``refinement.__all__`` is exactly what it exports, and each name is the module's own."""

from __future__ import annotations

import importlib

import pytest

from hansgate import refinement


def test_all_names_resolve_to_their_modules():
    assert len(set(refinement.__all__)) == len(refinement.__all__)
    for name in refinement.__all__:
        obj = getattr(refinement, name)
        module = importlib.import_module(refinement._LAZY[name])
        assert obj is getattr(module, name)
        assert name in module.__all__, f"{name} is not public in {module.__name__}"


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError):
        refinement.not_there  # noqa: B018
