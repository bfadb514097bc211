"""The attributes CSV: round trip and one clear DataError per kind of bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from hansgate.audit.inputs import read_attributes, write_attributes
from hansgate.errors import DataError
from hansgate.manifest import SubgroupAttribute


class _Manifest:
    subgroups = [SubgroupAttribute(name="site", values=["A", "B"])]


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "attrs.csv"
    p.write_text(text)
    return p


def test_round_trip(tmp_path):
    attrs = {"site": np.array(["A", "B", "A"]), "stroke": np.array(["thin", "thick", "thin"])}
    p = write_attributes(tmp_path / "a.csv", attrs)
    got = read_attributes(p, 3, _Manifest())
    assert set(got) == {"site", "stroke"}
    for k in attrs:
        np.testing.assert_array_equal(got[k], attrs[k])


def test_index_column_reorders_rows(tmp_path):
    p = _write(tmp_path, "index,site\n2,B\n0,A\n1,A\n")
    np.testing.assert_array_equal(read_attributes(p, 3)["site"], ["A", "A", "B"])


def test_without_index_column_rows_are_in_data_order(tmp_path):
    p = _write(tmp_path, "site\nB\nA\n")
    np.testing.assert_array_equal(read_attributes(p, 2)["site"], ["B", "A"])


@pytest.mark.parametrize("text, n, match", [
    ("index,site\n0,A\n1,B\n", 3, "2 rows, but the data has 3"),
    ("index,site\n0,A\n1,B\n2,A\n3,A\n", 3, "4 rows, but the data has 3"),
    ("index,site\n0,A\n0,B\n", 2, "exactly once"),
    ("index,site\nx,A\n1,B\n", 2, "integers"),
    ("index,stroke\n0,thin\n1,thick\n", 2, "declares attributes \\['site'\\]"),
    ("index,site\n0,A\n1,C\n", 2, "values \\['C'\\]"),
    ("index,site\n0,A\n1,\n", 2, "empty values"),
    ("index,site\n0,A\n1\n", 2, "row 3 has 1 fields"),
    ("index,si te\n0,A\n1,B\n", 2, "column names"),
    ("index,site,site\n0,A,A\n1,B,B\n", 2, "duplicate"),
    ("", 2, "empty file"),
    ("index\n0\n1\n", 2, "no attribute columns"),
])
def test_bad_csv_is_one_clear_data_error(tmp_path, text, n, match):
    with pytest.raises(DataError, match=match):
        read_attributes(_write(tmp_path, text), n, _Manifest())


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_attributes(tmp_path / "nope.csv", 2)


def test_too_many_values_for_an_undeclared_attribute(tmp_path):
    rows = "\n".join(f"{i},v{i}" for i in range(70))
    with pytest.raises(DataError, match="at most 64"):
        read_attributes(_write(tmp_path, "index,batch\n" + rows + "\n"), 70)


def test_tcav_sign_counts_equal_the_gateways_batch_stats():
    """The report counts TCAV signs like the service's counters do (service.metrics.batch_stats)."""
    from hansgate.audit.inputs import tcav_sign_counts
    from hansgate.service.metrics import batch_stats

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(200, 4))
    sens = rng.normal(size=(200, 3, 4))
    positive, samples = tcav_sign_counts(logits, sens, ["c0", "c1", "c2"], ["a", "b", "c", "d"])
    _, stats = batch_stats(logits, rng.normal(size=(200, 3)), sens, np.zeros(3))
    for m, concept in enumerate(["c0", "c1", "c2"]):
        for k, cls in enumerate(["a", "b", "c", "d"]):
            assert positive[(concept, cls)] == stats.tcav_positive[m, k]
            assert samples[(concept, cls)] == stats.classes[k]
