"""`limit_heap_retention`: a freed layer-sized buffer goes back to the OS instead of staying
resident in the heap (glibc's dynamic mmap threshold would otherwise keep it)."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PROBE = textwrap.dedent('''
    import ctypes, sys
    from stoker.trainer.deepspeed_engine import limit_heap_retention

    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    page = 4096

    def rss_mb():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page / 2**20

    set_it = sys.argv[1] == "limit" and limit_heap_retention()
    size = 8 << 20
    baseline = rss_mb()
    for _ in range(2):
        # The first free raises glibc's default threshold to 8 MB, so the second buffer comes
        # from the heap and stays resident after it is freed.
        block = libc.malloc(size)
        ctypes.memset(block, 1, size)
        libc.free(block)
    retained = rss_mb() - baseline
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    touched = rss_mb() - baseline
    libc.free(block)
    print(set_it, round(retained, 1), round(touched, 1), round(rss_mb() - baseline, 1))
''')


def _run(mode: str) -> tuple[bool, float, float, float]:
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, env=env, check=True)
    flag, *sizes = out.stdout.split()
    retained, touched, after = map(float, sizes)
    return flag == "True", retained, touched, after


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux-only")
def test_freed_large_buffers_leave_the_process():
    set_it, retained, touched, after = _run("limit")
    assert set_it
    assert touched >= 7  # the probe really touched 8 MB
    assert retained < 1 and after < 1  # and every free returned the pages
    _, default_retained, _, default_after = _run("default")
    # Without the limit glibc keeps the freed buffer in the heap, resident: what the setting
    # exists to avoid (if this stops holding, glibc's defaults changed and the setting may go).
    assert default_retained >= 7 and default_after >= 7


ENGINE_PROBE = textwrap.dedent('''
    import ctypes, sys
    from tests.trainer import ds_checkpoints

    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]

    def rss_mb():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096 / 2**20

    def retained_mb():
        """What an 8 MB buffer, freed twice, leaves resident (as in PROBE)."""
        baseline = rss_mb()
        for _ in range(2):
            block = libc.malloc(8 << 20)
            ctypes.memset(block, 1, 8 << 20)
            libc.free(block)
        return round(rss_mb() - baseline, 1)

    ds_checkpoints._init_distributed()
    for stage in (0, 1):  # ZeRO 0 first: the threshold, once set, stays for the process
        ds_checkpoints.build({"stage": stage, "bf16": False, "offload": False})
        print(stage, retained_mb())
''')


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux-only")
def test_engine_limits_heap_only_where_zero_shards():
    """ZeRO 0 keeps glibc's default: large activations (an LM's logits) reuse heap buffers
    instead of being mapped and faulted in anew every step; ZeRO 1-3 set the limit."""
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    out = subprocess.run([sys.executable, "-c", ENGINE_PROBE], capture_output=True, text=True, env=env,
                         cwd=Path(__file__).resolve().parents[2], timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    retained = dict(line.split() for line in out.stdout.splitlines() if line[:1] in "01")
    assert float(retained["0"]) >= 7, out.stdout  # default threshold: the freed buffer stays
    assert float(retained["1"]) < 1, out.stdout  # the limit: it goes back to the OS
