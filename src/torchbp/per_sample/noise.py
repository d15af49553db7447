"""DP-SGD's Gaussian noise, drawn in parallel on CPU.

torch's CPU generator (mt19937) is sequential: one thread draws about 3.7 ns per Gaussian,
so the 1.9 M draws of a 784-1024-1024-10 MLP cost more than half a plain SGD step. The
noise is therefore drawn in fixed chunks of :data:`CHUNK` elements, each by its own
generator seeded from the caller's (or the global) generator, on up to
``torch.get_num_threads()`` threads. The chunking does not depend on the thread count, so
a seeded generator gives the same noise on any machine. On CUDA one call per parameter is
already fast and is used as is.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import torch

__all__ = ["CHUNK", "add_gaussian_noise_"]

#: elements per independently seeded generator
CHUNK = 1 << 18

_pool: ThreadPoolExecutor | None = None
_pool_workers = 0
_pool_lock = threading.Lock()


def _executor() -> ThreadPoolExecutor:
    global _pool, _pool_workers
    with _pool_lock:
        workers = max(1, torch.get_num_threads())
        if _pool is None or _pool_workers != workers:
            _pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="torchbp-noise")
            _pool_workers = workers
        return _pool


def _add_chunk(grad: torch.Tensor, std: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    # grad += N(0, std²), drawn by this chunk's own generator
    grad.add_(torch.randn(grad.shape, generator=g, dtype=grad.dtype), alpha=std)


def _chunks(t: torch.Tensor) -> list[torch.Tensor]:
    if not t.is_contiguous():
        return [t]  # drawn whole: a view of a strided tensor cannot be flattened
    flat = t.view(-1)
    return [flat[i : i + CHUNK] for i in range(0, flat.numel(), CHUNK)]


def add_gaussian_noise_(
    grads: list[torch.Tensor], std: float, generator: torch.Generator | None = None
) -> None:
    """Add ``N(0, std²)`` to every element of each tensor of ``grads``, in place.

    Args:
        grads: gradient tensors, all on one device.
        std: the standard deviation ``σC``.
        generator: seeds the noise (default: the global generator of the tensors' device).
    """
    chunks: list[torch.Tensor] = []
    for t in grads:
        if t.device.type == "cpu":
            chunks.extend(_chunks(t))
        else:
            noise = torch.randn(t.shape, generator=generator, dtype=t.dtype, device=t.device)
            t.add_(noise, alpha=std)
    if not chunks:
        return
    seeds = torch.randint(0, 2**62, (len(chunks),), generator=generator).tolist()
    if len(chunks) == 1 or torch.get_num_threads() == 1:
        for chunk, seed in zip(chunks, seeds):
            _add_chunk(chunk, std, seed)
        return
    futures = [_executor().submit(_add_chunk, c, std, s) for c, s in zip(chunks, seeds)]
    for future in futures:
        future.result()
