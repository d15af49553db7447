"""How messages name :func:`~torchbp.verify.check_function`'s options: as its keyword
arguments (``skip=['gradcheck']``), or, while the ``torchbp-verify`` command runs the
checks (:func:`command_line_spelling`), as that command's flags (``--skip gradcheck``),
so that the advice a message gives is what its reader can type. Every message naming an
option spells it through this module, the one place that knows both spellings."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any

import torch

__all__ = ["command_line_spelling", "inputs_in_domain", "keep_dtype", "option", "option_name"]

_ON_COMMAND_LINE = contextvars.ContextVar("torchbp_verify_command_line", default=False)

#: The ``torchbp-verify`` flag of each option a message may advise, and what stands for
#: its value when the message names none.
FLAGS = {
    "skip": ("--skip", "CHECK"),
    "require": ("--require", "CHECK"),
    "grad_inputs": ("--grad-inputs", "I,J"),
    "reference": ("--reference", "module:Symbol naming"),
    "dtype": ("--dtype", "NAME"),
    "eps": ("--eps", "EPS"),
    "atol": ("--atol", "ATOL"),
    "rtol": ("--rtol", "RTOL"),
    "nondet_tol": ("--nondet-tol", "TOL"),
    "parity_atol": ("--parity-atol", "ATOL"),
    "parity_rtol": ("--parity-rtol", "RTOL"),
}

#: Marks an option named without a value (``reference=`` followed by words).
_NO_VALUE = object()


@contextlib.contextmanager
def command_line_spelling() -> Iterator[None]:
    """Within this block, :func:`option` spells options as ``torchbp-verify``'s flags.

    Examples:
        >>> with command_line_spelling():
        ...     option("skip", ["gradcheck", "forward_ad"])
        '--skip gradcheck,forward_ad'
        >>> option("skip", ["gradcheck"])
        "skip=['gradcheck']"
    """
    token = _ON_COMMAND_LINE.set(True)
    try:
        yield
    finally:
        _ON_COMMAND_LINE.reset(token)


def option_name(name: str) -> str:
    """The option ``name`` alone: ``skip``, or ``--skip`` on the command line (where an
    option without a flag keeps its name)."""
    if _ON_COMMAND_LINE.get() and name in FLAGS:
        return FLAGS[name][0]
    return name


def option(name: str, value: Any = _NO_VALUE) -> str:
    """The option ``name`` set to ``value`` as the reader passes it: ``skip=['gradcheck']``,
    ``grad_inputs=(0, 2)``, or on the command line ``--skip gradcheck``,
    ``--grad-inputs 0,2``; without ``value``, the option followed by what its value is
    (``reference=`` / ``--reference module:Symbol naming``).

    Args:
        name: one of :data:`FLAGS`.
        value: the value: a sequence of check names or input positions, or a dtype.

    Examples:
        >>> option("grad_inputs", (0,))
        'grad_inputs=(0,)'
        >>> with command_line_spelling():
        ...     option("grad_inputs", (0, 2))
        '--grad-inputs 0,2'
    """
    flag, metavar = FLAGS[name]
    if not _ON_COMMAND_LINE.get():
        return f"{name}=" if value is _NO_VALUE else f"{name}={value!r}"
    if value is _NO_VALUE:
        return f"{flag} {metavar}"
    if isinstance(value, (list, tuple)):
        return f"{flag} {','.join(map(str, value))}"
    if isinstance(value, torch.dtype):
        return f"{flag} {str(value).removeprefix('torch.')}"
    return f"{flag} {value}"


def keep_dtype(dtype: torch.dtype) -> str:
    """How to have fn called with its inputs in their own dtypes (``dtype``, one input's)
    rather than cast: ``dtype=None`` (each input its own) or ``dtype=dtype`` in Python;
    ``--dtype`` on the command line, whose inputs all share one dtype."""
    if _ON_COMMAND_LINE.get():
        return option("dtype", dtype)
    return f"dtype=None to keep each input's dtype, or {option('dtype', dtype)}"


def inputs_in_domain() -> str:
    """How to give a fn with a restricted domain (a log, a sqrt, an acos, a Function
    refusing negative inputs) inputs inside it: built in Python, or on the command line
    drawn from a range after the shape (``--inputs '4,5[0.1,2]'``)."""
    if _ON_COMMAND_LINE.get():
        return (
            "draw the inputs inside fn's domain with a range after their shape, e.g. "
            "--inputs '4,5[0.1,2]' (uniform in [0.1, 2]) for a log or a sqrt, "
            "'4,5[-0.9,0.9]' for an acos"
        )
    return (
        "pass inputs inside fn's domain, e.g. x.abs() + 0.1 for a log or a sqrt, "
        "x.clamp(-0.9, 0.9) for an acos"
    )
