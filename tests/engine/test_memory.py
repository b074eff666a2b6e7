"""The host heap keeps the round's freed temporaries (no fresh mmap, no page faults, per round on the CPU)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from qstar_cli.engine.memory import keep_freed_host_memory
from tests.helpers import make_sampler

#: Allocates a 40 MiB tensor and frees it; prints glibc's accounting (``mallinfo2``) while it is
#: alive and after: bytes in mmapped blocks, and free bytes the heap keeps.
ROUND = """
import ctypes, sys, torch
from qstar_cli.engine.memory import keep_freed_host_memory
class Info(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
if sys.argv[1] == "keep":
    assert keep_freed_host_memory()
temporary = torch.ones(10 << 20)
alive = libc.mallinfo2()
del temporary
freed = libc.mallinfo2()
print(alive.hblkhd, freed.fordblks)
"""
MIB = 1 << 20


def accounting(mode: str) -> tuple[int, int]:
    out = subprocess.run([sys.executable, "-c", ROUND, mode], capture_output=True, text=True, check=True).stdout
    mmapped, kept = map(int, out.split())
    return mmapped, kept


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc settings are Linux-only")
def test_freed_temporaries_stay_in_the_heap_for_the_next_round():
    # By default a 40 MiB block is a fresh mmap (faulted in page by page), unmapped when freed.
    mmapped, kept = accounting("default")
    assert mmapped >= 40 * MIB and kept < 40 * MIB
    # Kept: the block comes from the heap, and the heap keeps it once freed, for the next round.
    mmapped, kept = accounting("keep")
    assert mmapped < 40 * MIB and kept >= 40 * MIB


def test_sampler_on_the_cpu_sets_the_heap(pair):
    keep_freed_host_memory.cache_clear()
    make_sampler(pair)
    assert keep_freed_host_memory.cache_info().currsize == 1
