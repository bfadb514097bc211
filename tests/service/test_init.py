"""service/__init__.py: ``__all__`` is exactly what the package makes public."""

from __future__ import annotations

from hansgate import service


def test_all_is_public_and_importable():
    public = {n for n in dir(service) if not n.startswith("_")}
    modules = {"app", "batching", "config", "errors", "gateway", "inputs", "metrics", "receipts", "runtime", "schemas",
               "limits", "multiproc", "protocol", "fairness", "fairness_metrics", "threads", "allocator",
               "accepts"}
    assert set(service.__all__) == public - modules
    for name in service.__all__:
        assert getattr(service, name) is not None
