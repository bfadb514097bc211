"""L4: the demo on the embedded data (``hansgate demo``): train the third-party model, refine
with every method, write the bundle and the audit report.
"""

from __future__ import annotations

from hansgate.demo.audit import digit_region, write_demo_audit
from hansgate.demo.run import DemoConfig, run_demo, subgroup_specs

__all__ = [
    "DemoConfig",
    "run_demo",
    "subgroup_specs",
    "digit_region",
    "write_demo_audit",
]
