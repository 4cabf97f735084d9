"""Split the approximator's pairs over CPU worker threads, one torch thread each.

The bursty conditional runs about a hundred small elementwise and matrix operations per
block of pairs. Torch's own intra-op parallelism splits every one of them across its
threads and synchronises after each. Giving each thread its own share of the pairs, with
one intra-op thread, uses the same cores without that synchronisation: on two cores 0.086
s against 0.100 s per 256,000 pairs, forward + backward
(``benchmarks/approximator_breakdown.py``). Torch releases the GIL inside its
kernels, so Python threads suffice.

The number of shares follows ``torch.get_num_threads()`` of the calling thread, so
``torch.set_num_threads(1)`` keeps everything on the caller's thread.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait

import torch
from torch import Tensor

_pools: dict[int, ThreadPoolExecutor] = {}
_lock = threading.Lock()


def _single_threaded_worker() -> None:
    torch.set_num_threads(1)


def _pool(workers: int) -> ThreadPoolExecutor:
    """A persistent pool of ``workers`` threads whose torch ops run single-threaded.

    ``torch.set_num_threads(1)`` in a worker also writes the process-wide default that
    threads created later start from; :func:`map_chunks` restores it once its workers are
    done (the pool starts its threads on first use, inside that call).
    """
    with _lock:
        if workers not in _pools:
            _pools[workers] = ThreadPoolExecutor(
                workers, thread_name_prefix="pybivi-cme", initializer=_single_threaded_worker
            )
        return _pools[workers]


def chunk_bounds(n_items: int, workers: int, align: int) -> list[slice]:
    """At most ``workers`` contiguous slices covering ``n_items``, each a multiple of ``align``.

    Aligned chunks keep the block boundaries of the sequential computation, so the results
    do not depend on the number of workers.
    """
    if n_items == 0:
        return [slice(0, 0)]
    blocks = -(-n_items // align)
    per_chunk = -(-blocks // max(1, workers)) * align
    return [slice(i, min(n_items, i + per_chunk)) for i in range(0, n_items, per_chunk)]


def map_chunks(
    fn: Callable[..., tuple[Tensor, Sequence[Tensor | None]]],
    tensors: Sequence[Tensor],
    align: int,
) -> tuple[Tensor, list[Tensor | None]]:
    """Apply ``fn(*chunk) -> (values, derivatives)`` to aligned chunks of 1-D ``tensors``.

    CPU tensors with more than one block of ``align`` items are split into
    ``torch.get_num_threads()`` chunks: the caller's thread computes the first, worker
    threads the others, all in the caller's gradient mode and with one torch thread each
    (the caller's thread count is set to 1 meanwhile and restored afterwards: torch's and
    MKL's own threads would compete with the workers for the same cores). Otherwise ``fn``
    runs on the caller's thread alone. Returns the concatenated values and derivatives
    (``None`` entries stay ``None``).
    """
    n_items = tensors[0].numel()
    threads = torch.get_num_threads()
    workers = min(threads, -(-n_items // align))
    if workers <= 1 or tensors[0].device.type != "cpu":
        out, derivs = fn(*tensors)
        return out, list(derivs)
    chunks = chunk_bounds(n_items, workers, align)
    grad_mode = torch.is_grad_enabled()  # thread-local: the workers take the caller's

    def run(*chunk: Tensor):
        with torch.set_grad_enabled(grad_mode):
            return fn(*chunk)

    pool = _pool(len(chunks) - 1)
    torch.set_num_threads(1)
    futures = []
    try:
        futures = [pool.submit(run, *(t[sl] for t in tensors)) for sl in chunks[1:]]
        results = [fn(*(t[chunks[0]] for t in tensors))]
        results += [f.result() for f in futures]
    finally:
        wait(futures)  # nothing left running on an error, before the threads come back
        torch.set_num_threads(threads)
    out = torch.cat([r[0] for r in results])
    derivs: list[Tensor | None] = []
    for j, d in enumerate(results[0][1]):
        derivs.append(None if d is None else torch.cat([r[1][j] for r in results]))
    return out, derivs
