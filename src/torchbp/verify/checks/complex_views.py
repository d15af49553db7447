"""Complex tensors checked as real ones: a complex input ``z`` is given to the checks as
its real view ``torch.view_as_real(z)`` (shape ``(*z.shape, 2)``: real and imaginary
parts) and turned back into ``z`` before each call of fn, and a complex output is
compared and differentiated as its real view (``compare.float_tensors``).

The checks then see a real function of real inputs, whose Jacobian is the real Jacobian
of the complex one: PyTorch's convention for the gradient of a real loss ``L`` with
respect to a complex ``z`` (the conjugate Wirtinger derivative, ``∂L/∂x + i ∂L/∂y``) is
exactly what ``view_as_real`` / ``view_as_complex`` pass between the two, so a backward
right in that convention passes and one that forgets a ``conj`` fails.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = ["complex_positions", "real_function", "real_view"]


def complex_positions(inputs: Sequence[Any]) -> frozenset[int]:
    """Positions of the complex tensors among ``inputs``."""
    return frozenset(
        i for i, x in enumerate(inputs) if isinstance(x, torch.Tensor) and x.is_complex()
    )


def real_view(z: torch.Tensor) -> torch.Tensor:
    """A real tensor of shape ``(*z.shape, 2)`` holding ``z``'s real and imaginary parts
    (a copy: never ``z``'s storage)."""
    return torch.view_as_real(z.detach().resolve_conj()).clone()


def _as_complex(real: torch.Tensor) -> torch.Tensor:
    """The complex tensor whose real view is ``real``: a view of it when its real and
    imaginary parts lie side by side (a transposed complex tensor's real view keeps its
    layout), else of a contiguous copy; always of a contiguous one under torch.compile,
    whose Dynamo cannot trace ``storage_offset()`` (the compile check would otherwise
    find every complex fn impossible to capture in one graph)."""
    if torch.compiler.is_compiling():
        return torch.view_as_complex(real.contiguous())
    paired = (
        real.stride(-1) == 1
        and all(s % 2 == 0 for s in real.stride()[:-1])
        and real.storage_offset() % 2 == 0
    )
    return torch.view_as_complex(real if paired else real.contiguous())


def real_function(fn: Callable[..., Any], positions: frozenset[int]) -> Callable[..., Any]:
    """``fn`` taking the real views of its complex inputs at ``positions`` (its complex
    outputs are seen as their real views by
    :func:`~torchbp.verify.checks.compare.float_tensors`)."""

    def on_real_views(*args: Any) -> Any:
        args = tuple(_as_complex(a) if i in positions else a for i, a in enumerate(args))
        return fn(*args)

    on_real_views.__qualname__ = on_real_views.__name__ = getattr(fn, "__name__", "fn")
    return on_real_views
