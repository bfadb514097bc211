"""Atomic result directories and JSON-safe conversion."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hansgate.files import atomic_directory, to_jsonable


def test_directory_appears_whole_or_not_at_all(tmp_path):
    out = tmp_path / "report"
    with pytest.raises(RuntimeError):
        with atomic_directory(out) as tmp:
            (tmp / "half.json").write_text("{}")
            raise RuntimeError("renderer crashed")
    assert list(tmp_path.iterdir()) == []
    with atomic_directory(out) as tmp:
        (tmp / "a.txt").write_text("1")
    assert (out / "a.txt").read_text() == "1" and (out.stat().st_mode & 0o777) == 0o755
    with atomic_directory(out) as tmp:  # replaces the old content entirely
        (tmp / "b.txt").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == ["b.txt"]
    with pytest.raises(FileExistsError):
        with atomic_directory(out, overwrite=False):
            pass


def test_to_jsonable_is_strict_json():
    data = {1: np.float32(0.5), "t": torch.tensor([1.0, 2.0]), "a": np.arange(3), "nan": float("nan"),
            "nested": ({"x": np.int64(4)}, "s")}
    plain = to_jsonable(data)
    assert plain == {"1": 0.5, "t": [1.0, 2.0], "a": [0, 1, 2], "nan": None, "nested": [{"x": 4}, "s"]}
    json.dumps(plain, allow_nan=False)
