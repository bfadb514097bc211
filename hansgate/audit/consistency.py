"""Checks that a rendered report shows only numbers its ``report.json`` holds (issue 5's bar).

Used by the report tests and by ``benchmarks/audit_bench.py``, so both judge the same way:
every number in an HTML table cell must appear among the JSON's numbers as the report
formats them (``fmt_num`` with 3 or 4 digits) or inside a JSON string.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser
from typing import Any

from hansgate.audit.report import fmt_num

__all__ = ["NUMBER", "HtmlContents", "json_number_tokens", "html_numbers_missing_from_json"]

NUMBER = re.compile(r"\d+(?:\.\d+)?")


class HtmlContents(HTMLParser):
    """Text of every ``<td>`` (``cells``) and the attributes of every ``<img>`` (``imgs``)."""

    def __init__(self) -> None:
        super().__init__()
        self.cells: list[str] = []
        self.imgs: list[dict[str, str | None]] = []
        self._td = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "td":
            self._td += 1
            self.cells.append("")
        if tag == "img":
            self.imgs.append(dict(attrs))

    def handle_endtag(self, tag: str) -> None:
        if tag == "td":
            self._td -= 1

    def handle_data(self, data: str) -> None:
        if self._td:
            self.cells[-1] += data


def json_number_tokens(obj: Any, out: set[str] | None = None) -> set[str]:
    """Every number of a JSON value, as the report prints it (unsigned), plus digits inside strings."""
    out = set() if out is None else out
    if isinstance(obj, dict):
        for k, v in obj.items():
            json_number_tokens(k, out)
            json_number_tokens(v, out)
    elif isinstance(obj, list):
        for v in obj:
            json_number_tokens(v, out)
    elif isinstance(obj, bool) or obj is None:
        pass
    elif isinstance(obj, (int, float)):
        out.update(fmt_num(obj, d).lstrip("-") for d in (3, 4))
    elif isinstance(obj, str):
        out.update(NUMBER.findall(obj))
    return out


def html_numbers_missing_from_json(html: str, report: Any) -> tuple[list[str], list[str]]:
    """``(numbers in the HTML tables, sorted distinct ones the JSON lacks)``."""
    parser = HtmlContents()
    parser.feed(html)
    numbers = [tok for cell in parser.cells for tok in NUMBER.findall(cell)]
    known = json_number_tokens(report)
    return numbers, sorted({n for n in numbers if n not in known})
