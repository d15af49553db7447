"""The arguments of :func:`~torchbp.verify.check_function`: validated, and the inputs prepared.

Bad arguments raise ``TypeError`` / ``ValueError`` here, before any check runs.
"""

from __future__ import annotations

import enum
import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import torch

from torchbp.verify.checks.complex_views import real_view
from torchbp.verify.checks.context import generator_copy
from torchbp.verify.checks.explain import first_line
from torchbp.verify.checks.spelling import option_name
from torchbp.verify.checks.table import CHECKS

__all__ = ["DEFAULT_OPTIONS", "SCALAR_TYPES", "Options", "prepare_inputs", "resolve_arguments"]

#: Non-tensor inputs a function may take (a ``dim``, a reduction given as a string or an
#: enum member, an index given as a slice), passed through unchanged.
SCALAR_TYPES = (
    bool,
    int,
    float,
    complex,
    str,
    type(None),
    enum.Enum,
    slice,
    type(Ellipsis),
    torch.dtype,
    torch.device,
    torch.Size,
    torch.layout,
    torch.memory_format,
)


@dataclass(frozen=True)
class Options:
    """The keyword options of :func:`~torchbp.verify.check_function` (documented there)."""

    dtype: torch.dtype | None = torch.float64
    device: torch.device | str | None = None
    grad_inputs: int | Sequence[int] | None = None
    checks: Sequence[str] | None = None
    skip: Sequence[str] | None = ()
    require: Sequence[str] = ()
    eps: float = 1e-6
    atol: float = 1e-5
    rtol: float = 1e-3
    fast_mode: bool = False
    nondet_tol: float = 0.0
    parity_atol: float | None = None
    parity_rtol: float | None = None
    compile_backend: str | Callable[..., Any] = "aot_eager"
    compile_fullgraph: bool = True
    vmap_batch: int = 3
    seed: int = 0
    name: str | None = None


#: Options accepted by :func:`~torchbp.verify.check_function` and their defaults.
DEFAULT_OPTIONS: dict[str, Any] = {f.name: f.default for f in fields(Options)}


def _function_apply(fn: Any) -> Any:
    """``fn.apply`` for a ``torch.autograd.Function`` subclass, else ``fn`` itself."""
    if isinstance(fn, type) and issubclass(fn, torch.autograd.Function):
        return fn.apply
    return fn


def _how_to_pass(value: Any) -> str:
    """How to pass an input check_function does not take (the end of a sentence): tensors
    inside a container as separate inputs, a dict or a callable bound in a wrapper of fn,
    a NumPy number as a Python one, anything else converted to a tensor."""
    items = value.values() if isinstance(value, dict) else value
    if isinstance(value, tuple | list | dict) and any(isinstance(e, torch.Tensor) for e in items):
        return (
            " holding tensors; check_function differentiates tensors given as separate "
            "inputs: pass them so and wrap fn, e.g. lambda a, b: fn([a, b])"
        )
    if isinstance(value, dict) or callable(value):
        return (
            "; inputs are tensors, scalars and tuples or lists of scalars: bind it in a "
            "wrapper of fn, e.g. functools.partial(fn, key=value) for keyword arguments or "
            "lambda x: fn(x, value)"
        )
    if isinstance(value, numbers.Number):
        return (
            "; pass a number (a dim, a scale) as a Python number: int(value) or "
            "float(value), or a value to differentiate as a tensor: torch.as_tensor(value)"
        )
    return (
        "; inputs must be tensors (or plain Python scalars such as a dim argument, "
        "tuples and lists of them, or a torch.Generator). Convert it with torch.as_tensor(...)"
    )


def _check_inputs(inputs: tuple) -> None:
    if not inputs:
        raise ValueError("check_function: give at least one example input tensor after fn")
    for i, x in enumerate(inputs):
        if isinstance(x, torch.Tensor):
            continue
        if isinstance(x, (*SCALAR_TYPES, torch.Generator)):
            continue
        if isinstance(x, tuple | list) and all(isinstance(e, SCALAR_TYPES) for e in x):
            continue
        raise TypeError(f"check_function: input {i} is a {type(x).__name__}{_how_to_pass(x)}")
    if not any(isinstance(x, torch.Tensor) for x in inputs):
        lists = [i for i, x in enumerate(inputs) if isinstance(x, list)]
        hint = (
            f" (input {lists[0]} is a list: if it holds values, convert it with "
            "torch.as_tensor(...))"
            if lists
            else ""
        )
        raise TypeError(f"check_function: none of the inputs is a tensor{hint}")


def _is_integer(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_numbers(opts: Options) -> None:
    """The numeric and flag options: tolerances at least 0, ``eps`` above 0,
    ``vmap_batch`` at least 1 (a bad one would fail checks of a correct function, e.g.
    ``eps=0`` divides by 0); ``fast_mode`` and ``compile_fullgraph`` bools (``"no"`` would
    be read as true)."""
    if not _is_integer(opts.seed):
        raise TypeError(f"check_function: seed must be an int, got {opts.seed!r}")
    if not -(2**63) <= opts.seed < 2**64:  # what torch's generators take
        raise ValueError(f"check_function: seed must be in [-2**63, 2**64), got {opts.seed}")
    if opts.name is not None and not isinstance(opts.name, str):
        raise TypeError(
            f"check_function: name must be a str (the report's label) or None, got {opts.name!r}"
        )
    for flag in ("fast_mode", "compile_fullgraph"):
        if not isinstance(getattr(opts, flag), bool):
            raise TypeError(
                f"check_function: {flag} must be True or False, got {getattr(opts, flag)!r}"
            )
    if not _is_integer(opts.vmap_batch):
        raise TypeError(f"check_function: vmap_batch must be an int, got {opts.vmap_batch!r}")
    if opts.vmap_batch < 1:
        raise ValueError(f"check_function: vmap_batch must be at least 1, got {opts.vmap_batch}")
    lower_bounds = {"eps": 0.0, "atol": 0.0, "rtol": 0.0, "nondet_tol": 0.0}
    lower_bounds |= {"parity_atol": 0.0, "parity_rtol": 0.0}
    for name, bound in lower_bounds.items():
        value = getattr(opts, name)
        if value is None and name.startswith("parity_"):
            continue
        if not _is_number(value):
            raise TypeError(f"check_function: {name} must be a number, got {value!r}")
        strict = name == "eps"
        if not math.isfinite(value) or value < bound or (strict and value == bound):
            least = "above 0" if strict else "at least 0"
            raise ValueError(f"check_function: {name} must be a finite number {least}: {value}")


def _check_names(names: str | Sequence[str] | None) -> tuple[str, ...]:
    """``checks`` / ``skip`` / ``require`` as a tuple of names (one name may be given as a
    plain string, e.g. ``skip="compile"``)."""
    if isinstance(names, str):
        return (names,)
    return tuple(names or ())


def _refuse_skipped(
    names: Sequence[str] | None, option: str, role: str, skip: Sequence[str] | None
) -> None:
    """A ValueError when checks named in ``option`` (``role`` in words) are also skipped:
    the two contradict each other (a selected check silently not run)."""
    both = sorted(set(names or ()) & set(skip or ()))
    if both:
        raise ValueError(
            f"check_function: check(s) {', '.join(both)} are both {role} and skipped; "
            f"drop them from {option_name(option)} or from {option_name('skip')}"
        )


def _resolve_device(device: Any) -> torch.device | None:
    """``device`` as a ``torch.device`` (None stays None), checked to be one this machine
    has: a bad one would be silently ignored (``tensor.to(3.5)`` returns the tensor) or
    fail deep inside torch."""
    if device is None:
        return None
    if isinstance(device, bool) or not isinstance(device, str | int | torch.device):
        raise TypeError(
            "check_function: device must be a torch.device, a string such as 'cuda:0', "
            f"a device index or None; got {device!r}"
        )
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(
            f"check_function: device={device!r} is not a device: {first_line(str(exc))}"
        ) from None
    if resolved.type == "meta":
        return resolved  # refused with the inputs (no values to compare), in plain words
    try:
        torch.empty(0, device=resolved)
    except Exception as exc:  # noqa: BLE001 - whatever the backend raises, in words
        raise ValueError(
            f"check_function: device={device!r} is not available here "
            f"({type(exc).__name__}: {first_line(str(exc))})"
        ) from None
    return resolved


def _refuse_module_classes(fn: Any, reference: Any) -> None:
    """A TypeError for an ``nn.Module`` class given as fn or reference: calling it would
    construct a module instead of running one."""
    for role, value in (("fn", fn), ("reference", reference)):
        if isinstance(value, type) and issubclass(value, torch.nn.Module):
            raise TypeError(
                f"check_function: {role} is the nn.Module class {value.__name__}, not a "
                f"module: pass an instance, e.g. {value.__name__}() (calling the class would "
                "construct a module instead of running one)"
            )


def _with_check_names(opts: Options) -> Options:
    """``opts`` with ``checks`` / ``skip`` / ``require`` as tuples of names; a ValueError
    for an empty ``checks`` (it would select nothing), a name that is no check, or a check
    both selected (or required) and skipped."""
    opts = replace(
        opts,
        checks=None if opts.checks is None else _check_names(opts.checks),
        skip=_check_names(opts.skip),
        require=_check_names(opts.require),
    )
    if opts.checks is not None and not opts.checks:
        raise ValueError(
            "check_function: checks is empty, which would select no check; pass "
            "checks=None (the default) to run every check, or name at least one of "
            f"{', '.join(CHECKS)}"
        )
    named = sorted(set(opts.checks or ()) | set(opts.skip or ()) | set(opts.require))
    bad = [c for c in named if c not in CHECKS]
    if bad:
        raise ValueError(
            f"check_function: unknown check(s) {', '.join(bad)}; valid checks: {', '.join(CHECKS)}"
        )
    _refuse_skipped(opts.require, "require", "required", opts.skip)
    _refuse_skipped(opts.checks, "checks", "selected (checks)", opts.skip)
    return opts


def resolve_arguments(
    fn: Any, inputs: tuple, reference: Any, options: dict[str, Any]
) -> tuple[Callable[..., Any], Callable[..., Any] | None, Options]:
    """Validate the arguments of ``check_function``.

    Args:
        fn: the callable or ``torch.autograd.Function`` subclass to check.
        inputs: the example inputs.
        reference: the reference callable (or Function subclass), or None.
        options: the keyword options.

    Returns:
        ``(fn, reference, options)``: Function subclasses replaced by their ``apply`` (the
        report is then named after the class), the options with their defaults.

    Raises:
        TypeError / ValueError: on the first bad argument, in plain words.
    """
    unknown = sorted(set(options) - set(DEFAULT_OPTIONS))
    if unknown:
        raise TypeError(
            f"check_function got unknown option(s) {', '.join(unknown)}; valid options: "
            f"{', '.join(sorted(DEFAULT_OPTIONS))}"
        )
    opts = Options(**options)
    _refuse_module_classes(fn, reference)
    if isinstance(fn, type) and issubclass(fn, torch.autograd.Function):
        opts = replace(opts, name=opts.name or fn.__name__)
    fn = _function_apply(fn)
    if not callable(fn):
        raise TypeError(
            "check_function: fn must be callable (a function, an nn.Module or a "
            f"torch.autograd.Function subclass); got {type(fn).__name__}"
        )
    ref = _function_apply(reference)
    if reference is not None and not callable(ref):
        raise TypeError(
            f"check_function: reference must be callable or None; got {type(reference).__name__}"
        )
    _check_inputs(inputs)
    _check_numbers(opts)
    opts = _with_check_names(opts)
    opts = replace(opts, device=_resolve_device(opts.device))
    dtype = opts.dtype
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"check_function: dtype must be a floating torch.dtype or None: {dtype}")
    backend = opts.compile_backend
    if not (isinstance(backend, str) or callable(backend)):
        raise TypeError("check_function: compile_backend must be a backend name or callable")
    return fn, ref, opts


def _positions(grad_inputs: Any) -> tuple[Any, ...]:
    """``grad_inputs`` as a tuple of its entries: one integer (a Python or NumPy one) is
    one position; anything else must be a sequence of positions."""
    if isinstance(grad_inputs, numbers.Integral):
        return (grad_inputs,)
    # a str or a tensor is iterable, but no sequence of positions
    if not isinstance(grad_inputs, str | bytes | torch.Tensor):
        try:
            return tuple(grad_inputs)
        except TypeError:
            pass
    raise TypeError(
        "check_function: grad_inputs must be an input position or a sequence of them "
        f"(e.g. 0 or (0, 2)), got {type(grad_inputs).__name__}"
    )


def _grad_positions(
    args: list[Any], grad_inputs: int | Sequence[int] | None, parameters: bool = False
) -> list[int]:
    """Positions of the inputs to differentiate (all floating strided tensors by default:
    a sparse one, e.g. the matrix of a sparse-dense product, is passed through); none is
    fine when ``parameters`` (fn's module parameters are differentiated: an embedding
    given only indices)."""
    if grad_inputs is None:
        grad_idx = [
            i
            for i, a in enumerate(args)
            if isinstance(a, torch.Tensor) and a.is_floating_point() and a.layout == torch.strided
        ]
        if not grad_idx and not parameters:
            raise ValueError(
                "check_function: no floating-point tensor input to differentiate (integer "
                "tensors such as class targets cannot require gradients)"
            )
        return grad_idx
    grad_idx = []
    for i in _positions(grad_inputs):
        if not _is_integer(i) or not -len(args) <= i < len(args):
            raise ValueError(
                f"check_function: grad_inputs entry {i!r} is not a valid input position "
                f"(there are {len(args)} inputs)"
            )
        i = int(i) % len(args)
        if i in grad_idx:
            raise ValueError(
                f"check_function: grad_inputs lists input {i} twice; give each position once"
            )
        a = args[i]
        if not isinstance(a, torch.Tensor):
            raise ValueError(
                f"check_function: input {i} is a {type(a).__name__}, not a tensor; it cannot "
                "require gradients"
            )
        if not a.is_floating_point():
            raise ValueError(
                f"check_function: input {i} is an integer tensor ({a.dtype}); integer "
                "tensors cannot require gradients - leave it out of grad_inputs"
            )
        if a.layout != torch.strided:
            raise ValueError(
                f"check_function: input {i} is a sparse tensor ({a.layout}); the checks "
                "differentiate dense tensors by perturbing each element - leave it out of "
                "grad_inputs, or pass it dense (x.to_dense()) if fn takes a dense one"
            )
        grad_idx.append(i)
    if not grad_idx:
        raise ValueError("check_function: grad_inputs is empty; nothing to differentiate")
    return grad_idx


def _require_values(args: list[Any]) -> None:
    """Every check compares numbers: a tensor on the meta device (shape and dtype only)
    has none."""
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor) and a.is_meta:
            raise ValueError(
                f"check_function: input {i} is on the meta device, which holds no values, "
                "and every check compares numbers: give tensors on a real device (cpu, cuda)"
            )


def prepare_inputs(
    inputs: tuple, opts: Options, *, parameters: bool = False
) -> tuple[list[Any], list[int]]:
    """Detached copies of the inputs, cast to ``opts.dtype`` and moved to ``opts.device``.

    Args:
        inputs: the example inputs.
        opts: the validated options.
        parameters: whether fn's module parameters are differentiated too (then the inputs
            need hold no floating tensor to differentiate).

    Returns:
        ``(args, grad_idx)``: the prepared inputs and the positions to differentiate.

    Raises:
        ValueError: bad ``grad_inputs``, inputs on the meta device or on several devices,
            or differentiable inputs of several dtypes without ``dtype``.
    """
    dtype, device = opts.dtype, opts.device
    args: list[Any] = []
    for x in inputs:
        if isinstance(x, torch.Tensor):
            # never the caller's storage: a check may write into it; a complex tensor as
            # its real view (see checks.complex_views)
            t = real_view(x) if x.is_complex() else x.detach().clone()
            if device is not None:
                t = t.to(device)
            if t.is_floating_point() and dtype is not None:
                t = t.to(dtype)
            args.append(t)
        elif isinstance(x, torch.Generator):
            args.append(generator_copy(x))  # never advance the caller's generator
        else:
            args.append(list(x) if isinstance(x, list) else x)  # never the caller's list
    _require_values(args)
    grad_idx = _grad_positions(args, opts.grad_inputs, parameters)
    devices = {a.device for a in args if isinstance(a, torch.Tensor)}
    if len(devices) > 1:
        raise ValueError(
            f"check_function: inputs are on different devices ({', '.join(map(str, devices))}); "
            "pass device=... to move them all"
        )
    dtypes = {args[i].dtype for i in grad_idx}
    if len(dtypes) > 1 and dtype is None:
        raise ValueError(
            "check_function: differentiable inputs have different dtypes; pass dtype=..."
        )
    return args, grad_idx
