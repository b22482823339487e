"""CPU time of a process tree, for benchmarks that say where CPU went (Ray's workers, a
dashboard and its browser)."""

import psutil


def tree_cpu_s(pid: int | None = None) -> float:
    """CPU seconds used so far by a process (this one by default) and every live process
    under it; processes that already exited are not counted."""
    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0.0
    total = 0.0
    for process in processes:
        try:
            times = process.cpu_times()
            total += times.user + times.system
        except psutil.Error:
            pass  # exited meanwhile
    return total
