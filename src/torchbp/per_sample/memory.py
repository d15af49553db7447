"""Memory for materialised per-sample gradients: transparent huge pages on Linux.

``mode="grads"`` writes ``B × |θ|`` numbers into memory the process has never touched
(1.8 GiB per step for a 784-1024-1024-10 MLP at batch 256). With the usual 4 KiB pages
most of that time is the kernel's: one page fault, and one zeroed page, per 4 KiB. A
buffer advised ``MADV_HUGEPAGE`` is faulted in 2 MiB pages instead (the same thing
torch's ``THP_MEM_ALLOC_ENABLE=1`` does for every CPU allocation of the process), which
halves the time of forming the per-sample gradients on the 2-core machine of
``experiments/results/per_sample.md``.

Only large CPU buffers on Linux take this path; everything else is ``torch.empty``. The
buffer is a private anonymous ``mmap`` wrapped by :func:`torch.frombuffer`, which keeps
the mapping alive for as long as any view of it is; it is unmapped when the last one
goes. Such a tensor behaves like any other, except that its storage cannot be resized.
"""

from __future__ import annotations

import math
import mmap

import torch

__all__ = ["HUGE_PAGE", "MIN_BYTES", "empty", "zeros"]

#: the x86-64 / arm64 (4 KiB base pages) transparent huge page size
HUGE_PAGE = 2 << 20
#: buffers below this size come from torch's allocator
MIN_BYTES = 64 << 20

_HAS_MADVISE = hasattr(mmap, "MADV_HUGEPAGE") and hasattr(mmap, "MAP_ANONYMOUS")


def _huge_page_buffer(nbytes: int) -> torch.Tensor | None:
    """``nbytes`` of zero-filled memory (uint8), 2 MiB aligned and advised
    ``MADV_HUGEPAGE``; ``None`` if the platform refuses."""
    try:
        # private (a shared anonymous mapping would be shmem, which THP ignores);
        # one huge page more than asked, to align the start
        mapping = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        mapping.madvise(mmap.MADV_HUGEPAGE)
    except (OSError, ValueError):
        return None  # no THP in this kernel, or no address space: the usual allocator
    raw = torch.frombuffer(mapping, dtype=torch.uint8)
    start = -raw.data_ptr() % HUGE_PAGE
    return raw[start : start + nbytes]


def _huge_page_tensor(shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor | None:
    """A zero-filled huge-page tensor of ``shape`` with ``like``'s dtype, or ``None`` where
    torch's allocator serves instead: not on CPU, no ``madvise``, under :data:`MIN_BYTES`,
    or refused by the platform."""
    if not _HAS_MADVISE or like.device.type != "cpu":
        return None
    nbytes = math.prod(shape) * like.element_size()
    if nbytes < MIN_BYTES:
        return None
    raw = _huge_page_buffer(nbytes)
    return None if raw is None else raw.view(like.dtype).view(shape)


def empty(shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """An uninitialised tensor of ``shape`` with ``like``'s dtype and device (huge pages
    when large and on CPU under Linux)."""
    out = _huge_page_tensor(tuple(shape), like)
    return like.new_empty(shape) if out is None else out


def zeros(shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """Like :func:`empty`, filled with zeros (a fresh mapping already is: its pages are
    only faulted in when read or written)."""
    out = _huge_page_tensor(tuple(shape), like)
    return like.new_zeros(shape) if out is None else out
