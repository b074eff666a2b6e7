"""The host heap keeps the round's freed temporaries (no page faults per round on the CPU)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from qstar_cli.engine.memory import keep_freed_host_memory
from tests.helpers import make_sampler

#: Rounds that each allocate temporaries of 40, 24 and 12 MiB and free them all; prints the minor
#: page faults of six rounds after four rounds of warm-up.
ROUNDS = """
import resource, sys, torch
from qstar_cli.engine.memory import keep_freed_host_memory
if sys.argv[1] == "keep":
    assert keep_freed_host_memory()
for round in range(10):
    if round == 4:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    temporaries = [torch.ones(n << 18) for n in (40, 24, 12)]
    del temporaries
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
PAGES = (40 << 20) // 4096


def faults(mode: str) -> int:
    return int(subprocess.run([sys.executable, "-c", ROUNDS, mode], capture_output=True, text=True, check=True).stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc settings are Linux-only")
def test_freed_temporaries_are_reused_without_page_faults():
    # By default the 40 MiB block is a fresh mmap every round, faulted in again.
    assert faults("default") > PAGES
    # Kept: once warm, the rounds reuse the blocks they freed.
    assert faults("keep") < PAGES / 4


def test_sampler_on_the_cpu_sets_the_heap(pair):
    keep_freed_host_memory.cache_clear()
    make_sampler(pair)
    assert keep_freed_host_memory.cache_info().currsize == 1
