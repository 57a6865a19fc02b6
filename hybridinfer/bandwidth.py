"""Sustained memory read bandwidth, measured the way a decode kernel sees it: every core streaming through its
own large array (far beyond the last-level cache), reads only, best of several passes.

Two methods, best first:
- `c-read`: a small C kernel (`READ_KERNEL`) compiled at run time with the system C compiler, one pthread per
  core, each summing its own first-touched buffer with wide independent accumulators — what STREAM's read
  kernels and ggml's quantized GEMV do.
- `numpy-sum`: numpy reductions over large arrays in threads (numpy drops the GIL inside the loop). Its
  pairwise float summation is compute-heavier per byte, so on a few cores it can under-read the memory.
A single-threaded numpy copy under-reads badly (one core cannot keep enough misses in flight, and a copy's
write-allocate traffic is invisible to a bytes-copied count); neither method copies.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from .util import cache_dir

READ_KERNEL = r"""
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef struct { uint64_t *buf; size_t n; int reps; pthread_barrier_t *bar; double *secs; uint64_t sink; int id; } job_t;

volatile uint64_t g_sink;

static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec * 1e-9; }

static void *run(void *p) {
    job_t *j = (job_t *)p;
    for (size_t i = 0; i < j->n; i++) j->buf[i] = i;  /* first touch: pages land on this thread's node */
    uint64_t a0 = 0, a1 = 0, a2 = 0, a3 = 0, a4 = 0, a5 = 0, a6 = 0, a7 = 0;
    for (int r = 0; r < j->reps; r++) {
        pthread_barrier_wait(j->bar);
        double t0 = now();
        const uint64_t *b = j->buf;
        for (size_t i = 0; i + 8 <= j->n; i += 8) {  /* independent chains: the loop is load-bound, not add-bound */
            a0 += b[i]; a1 += b[i + 1]; a2 += b[i + 2]; a3 += b[i + 3];
            a4 += b[i + 4]; a5 += b[i + 5]; a6 += b[i + 6]; a7 += b[i + 7];
        }
        pthread_barrier_wait(j->bar);
        if (j->id == 0) j->secs[r] = now() - t0;
    }
    j->sink = a0 + a1 + a2 + a3 + a4 + a5 + a6 + a7;
    return 0;
}

/* -> best GB/s over reps; every thread reads bytes_per_thread per pass. */
double read_bandwidth(int threads, size_t bytes_per_thread, int reps) {
    pthread_t th[1024]; job_t jobs[1024]; double secs[256]; pthread_barrier_t bar;
    if (threads > 1024 || reps > 256) return -1;
    pthread_barrier_init(&bar, 0, threads);
    for (int t = 0; t < threads; t++) {
        jobs[t] = (job_t){aligned_alloc(64, bytes_per_thread), bytes_per_thread / 8, reps, &bar, secs, 0, t};
        if (!jobs[t].buf) return -1;
        pthread_create(&th[t], 0, run, &jobs[t]);
    }
    for (int t = 0; t < threads; t++) { pthread_join(th[t], 0); g_sink += jobs[t].sink; free(jobs[t].buf); }
    pthread_barrier_destroy(&bar);
    double best = 1e30;
    for (int r = 1; r < reps; r++) if (secs[r] < best) best = secs[r];  /* pass 0 warms the TLB */
    return (double)threads * bytes_per_thread / best / 1e9;
}
"""


@dataclass(frozen=True)
class Bandwidth:
    gbs: float
    method: str  # "c-read" | "numpy-sum"
    threads: int
    detail: str


def _compile() -> ctypes.CDLL | None:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        return None
    digest = hashlib.sha256(READ_KERNEL.encode()).hexdigest()[:12]
    lib = cache_dir() / "kernels" / f"readbw-{digest}.so"
    if not lib.exists():
        lib.parent.mkdir(parents=True, exist_ok=True)
        src = lib.with_suffix(".c")
        src.write_text(READ_KERNEL)
        tmp = lib.with_suffix(f".tmp{os.getpid()}.so")
        try:
            subprocess.run([cc, "-O3", "-march=native", "-shared", "-fPIC", "-pthread", "-o", str(tmp), str(src)],
                           check=True, capture_output=True, timeout=120)
        except (OSError, subprocess.SubprocessError):
            return None
        os.replace(tmp, lib)
    try:
        dll = ctypes.CDLL(str(lib))
    except OSError:
        return None
    dll.read_bandwidth.restype = ctypes.c_double
    dll.read_bandwidth.argtypes = [ctypes.c_int, ctypes.c_size_t, ctypes.c_int]
    return dll


def c_read(threads: int, mib_per_thread: int = 256, reps: int = 40) -> float | None:
    dll = _compile()
    if dll is None:
        return None
    gbs = dll.read_bandwidth(threads, mib_per_thread << 20, reps)
    return gbs if gbs > 0 else None


def numpy_sum(threads: int, mib_per_thread: int = 256, reps: int = 6) -> float:
    import numpy as np
    from concurrent.futures import ThreadPoolExecutor

    n = (mib_per_thread << 20) // 8
    with ThreadPoolExecutor(threads) as pool:
        arrays = list(pool.map(lambda _: np.ones(n), range(threads)))  # allocated and touched by its thread
        best = 0.0
        for _ in range(reps):
            t0 = time.perf_counter()
            list(pool.map(lambda a: float(a.sum()), arrays))
            best = max(best, threads * n * 8 / (time.perf_counter() - t0) / 1e9)
    return best


def measure(threads: int | None = None) -> Bandwidth:
    """Sustained read bandwidth over all cores (or `threads`), by the best available method."""
    # Many short passes, best kept: on a box shared with other work, some pass runs with the cores to itself.
    threads = threads or len(os.sched_getaffinity(0)) or os.cpu_count() or 1
    gbs = c_read(threads)
    if gbs:
        return Bandwidth(round(gbs, 1), "c-read", threads,
                         f"C read kernel (cc -O3 -march=native), {threads} threads x 256 MiB, best of 39 passes")
    gbs = numpy_sum(threads)
    return Bandwidth(round(gbs, 1), "numpy-sum", threads,
                     f"numpy sum in {threads} threads x 256 MiB, best of 6 passes (no C compiler found)")
