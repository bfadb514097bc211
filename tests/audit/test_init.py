"""``audit`` stays torch-free on import and its ``__all__`` is what it exports."""

from __future__ import annotations

import subprocess
import sys

from hansgate import audit


def test_import_does_not_load_torch():
    code = ("import sys, hansgate.audit, hansgate.audit.subgroups, hansgate.audit.compliance, hansgate.audit.inputs; "
            "from hansgate.audit import SubgroupAuditor, read_attributes; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_all_names_resolve():
    for name in audit.__all__:
        assert getattr(audit, name) is not None
    assert len(set(audit.__all__)) == len(audit.__all__)
