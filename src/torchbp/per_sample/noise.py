"""DP-SGD's Gaussian noise, drawn from one generator stream.

Every draw comes, in a fixed order, from the caller's generator (or the global one of the
tensors' device), so a seeded generator gives the same noise on any machine and every step
continues the same stream. On CPU the noise is drawn in chunks of :data:`CHUNK` elements,
so that no temporary as large as a big parameter is allocated.

The noise is not drawn in parallel by generators seeded from the caller's: torch's CPU
generator (mt19937) keeps only the low 32 bits of a seed, so such generators have at most
2**32 distinct streams, and over a training run two chunks would draw the same noise (about
even odds after 2**16 chunks). Identical noise in two steps cancels in the difference of
their updates, which DP-SGD's accounting assumes cannot happen.
"""

from __future__ import annotations

import torch

__all__ = ["CHUNK", "add_gaussian_noise_"]

#: elements drawn per temporary on CPU
CHUNK = 1 << 18


def _chunks(t: torch.Tensor) -> list[torch.Tensor]:
    """Views of ``t`` that cover it once, in order: :data:`CHUNK` elements each for a
    contiguous CPU tensor, else ``t`` whole."""
    if t.device.type != "cpu" or not t.is_contiguous():
        return [t]  # drawn whole: a view of a strided tensor cannot be flattened
    flat = t.view(-1)
    return [flat[i : i + CHUNK] for i in range(0, flat.numel(), CHUNK)]


def add_gaussian_noise_(
    grads: list[torch.Tensor], std: float, generator: torch.Generator | None = None
) -> None:
    """Add ``N(0, std²)`` to every element of each tensor of ``grads``, in place.

    Args:
        grads: gradient tensors, on any devices (each one's noise is drawn on its own).
        std: the standard deviation ``σC``.
        generator: draws the noise (default: the global generator of the tensors' device).
    """
    for t in grads:
        for chunk in _chunks(t):
            noise = torch.randn(
                chunk.shape, generator=generator, dtype=chunk.dtype, device=chunk.device
            )
            chunk.add_(noise, alpha=std)
