"""Writing result files: a directory that appears whole or not at all, and JSON-safe plain data.

Bundles (``hansgate.bundle``) and audit reports (``audit.report``) both promise that a
failure leaves nothing half-written; ``atomic_directory`` is that promise in one place.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

__all__ = ["atomic_directory", "to_jsonable"]


@contextmanager
def atomic_directory(out: str | Path, overwrite: bool = True) -> Iterator[Path]:
    """Yield a fresh temporary sibling of ``out``; on success it replaces ``out``, on error it is removed.

    The directory is made readable by others (``0755``; ``mkdtemp`` creates ``0700``), since
    bundles and reports are read by other users (a service account, a reviewer).
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def to_jsonable(obj: Any) -> Any:
    """Plain JSON types: mappings and sequences recursively, arrays/tensors/scalars via ``tolist``,
    and non-finite floats as ``None`` (strict JSON has no NaN)."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if not isinstance(obj, (str, bytes)) and hasattr(obj, "tolist"):  # numpy arrays/scalars, torch tensors
        return to_jsonable(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
