"""The glibc allocator setting applied before training (pybivi._allocator)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROUNDS = """
import resource, numpy as np
from pybivi._allocator import tune_allocator
applied = tune_allocator()
bufs = [np.ones(4 << 20, dtype=np.float32) for _ in range(3)]; del bufs  # first use faults
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(50):
    bufs = [np.ones(4 << 20, dtype=np.float32) for _ in range(3)]  # 3 x 16 MiB temporaries
    del bufs
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _run(env_value: str | None) -> tuple[bool, int]:
    env = dict(os.environ)
    env.pop("PYBIVI_TUNE_MALLOC", None)
    if env_value is not None:
        env["PYBIVI_TUNE_MALLOC"] = env_value
    out = subprocess.run(
        [sys.executable, "-c", ROUNDS], capture_output=True, text=True, env=env, check=True
    ).stdout.split()
    return out[0] == "True", int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc setting, Linux only")
def test_tuned_allocator_reuses_freed_buffers_without_page_faults():
    applied, faults = _run(None)
    assert applied
    # 50 rounds of touching 48 MiB are 600,000 page faults when the memory goes back to
    # the kernel each time (glibc's default trims the heap here); reused memory costs none.
    assert faults < 2000


def test_opt_out_leaves_the_allocator_alone():
    applied, _ = _run("0")
    assert not applied
