"""hansgate.service.allocator: body-sized buffers stop costing fresh page faults per request (glibc)."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

from hansgate.errors import ConfigError
from hansgate.service.allocator import reuse_large_buffers
from hansgate.service.limits import ServingOptions

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")

#: in a fresh process (mallopt changes the allocator for the whole process): minor page faults per
#: join of a 36 MiB body from 256 KiB socket chunks, after a warm-up join, with or without the setting
_PROBE = """
import json, os, resource, sys
from hansgate.service.allocator import reuse_large_buffers
changed = reuse_large_buffers(40 * 2**20) if sys.argv[1] == "1" else None
chunk = os.urandom(256 * 1024)
parts = [chunk] * 144
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
body = b"".join(parts); del body
before = faults()
for _ in range(5):
    body = b"".join(parts)
    assert body[-1] == chunk[-1]
    del body
print(json.dumps({"changed": changed, "faults_per_join": (faults() - before) / 5}))
"""


def _probe(on: bool) -> dict:
    out = subprocess.run([sys.executable, "-c", _PROBE, "1" if on else "0"], capture_output=True, text=True,
                         check=True, timeout=120)
    return json.loads(out.stdout)


@glibc
def test_a_body_sized_buffer_is_reused_instead_of_mapped_afresh():
    pages = 36 * 2**20 // 4096
    default, reused = _probe(False), _probe(True)
    assert default["faults_per_join"] > pages / 2  # glibc's default: a fresh mapping, touched page by page
    assert reused["changed"] is True
    assert reused["faults_per_join"] < pages / 20  # the freed heap block serves the next body


@pytest.mark.parametrize("largest", [0, -5])
def test_nothing_changes_for_a_bound_that_is_not_positive(largest):
    assert reuse_large_buffers(largest) is False


def test_the_setting_is_validated_and_on_by_default():
    assert ServingOptions.from_env({}).reuse_buffers is True
    assert ServingOptions.from_env({"HANSGATE_REUSE_BUFFERS": "0"}).reuse_buffers is False
    with pytest.raises(ConfigError, match="HANSGATE_REUSE_BUFFERS"):
        ServingOptions.from_env({"HANSGATE_REUSE_BUFFERS": "sometimes"})
