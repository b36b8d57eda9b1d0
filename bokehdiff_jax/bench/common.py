"""Small shared timing helpers for benchmarks (medians, peak RSS)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def median_time(fn: Callable[[], object], *, repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeats`` runs after ``warmup`` runs.

    ``fn`` must block until its result is ready (call ``jax.block_until_ready`` inside).
    """
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far, in bytes (Linux ``ru_maxrss`` is in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def limit_threads(n: int) -> None:
    """JAX (XLA:CPU) and PyTorch each compute on ``n`` threads in this process.

    XLA:CPU sizes its intra-op thread pool once, when its backend starts, from ``PJRT_NPROC`` (else the
    CPUs this process may run on); no XLA flag changes it (``--xla_cpu_multi_thread_eigen=false`` only
    stops Eigen's own splitting of a convolution or matmul: XNNPACK ops and parallel loop fusions still
    use every thread of the pool, and a run "at one thread" with that flag still used both cores). So
    this sets ``PJRT_NPROC`` and must run before the JAX backend starts (a fresh process); PyTorch gets
    ``set_num_threads(n)``. Raises ``RuntimeError`` if the backend already runs.
    """
    import os

    from jax._src import xla_bridge

    if n < 1:
        raise RuntimeError(f"limit_threads({n}): expected n >= 1")
    if xla_bridge.backends_are_initialized():
        raise RuntimeError("limit_threads: the JAX backend already runs; call it first, in a fresh process")
    os.environ["PJRT_NPROC"] = str(n)
    import torch

    torch.set_num_threads(n)


def thread_cpu_seconds() -> dict[int, float]:
    """CPU time (user + system, seconds) of each live thread of this process, by thread id (Linux).

    Differences over a timed call show how its work spread over threads, whatever the machine's load."""
    import os

    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended meanwhile
            continue
        out[int(tid)] = (int(fields[11]) + int(fields[12])) / tick
    return out
