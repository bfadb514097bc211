"""Codebase habits that a reviewer would otherwise check by hand (issue 11, STYLE.md habits 1 and 8)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "hansgate"
MODULES = sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)
#: a module longer than this says why in its docstring, with the words "longer than"
MAX_LINES = 450
#: a measured figure: a decimal timing, speed ratio or percentage (1.3 s, 1.22x, 4.5 %) or an accuracy-like
#: decimal (0.963), a before/after pair (0.59 -> 0.70, 0.96/0.93); the round numbers of a configuration (10 %, 0.7, 50 samples) pass
FIGURE = re.compile(r"\b\d+\.\d+\s?(?:ms|s|seconds|%)(?!\w)|\b\d+\.\d+x\b|\b0\.\d{3,}\b"
                    r"|\b\d+\.\d+\s?(?:->|→)|\b\d\.\d{2,}/\d\.\d{2,}")


def _docstring(path: Path) -> str:
    return ast.get_docstring(ast.parse(path.read_text())) or ""


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_module_is_small_or_says_why(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES or "longer than" in _docstring(path).lower(), f"{lines} lines and no reason given"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_module_docstring_quotes_no_measured_figure(path):
    found = FIGURE.findall(_docstring(path))
    assert not found, f"measured figures belong in benchmarks/results and the README: {found}"
