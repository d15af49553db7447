"""Plain-word messages for the exceptions torch raises while a check runs, and which of
them mean a missing capability (an unsupported check) rather than a bug (a failed one)."""

from __future__ import annotations

import inspect
import re
import sysconfig
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import torch

from torchbp.verify.checks.outcomes import CheckFailure, CheckUnsupported
from torchbp.verify.checks.spelling import option_name

__all__ = [
    "KERNEL_MISSING_FOR_A_DTYPE",
    "capability_gap",
    "explain_error",
    "first_line",
    "not_implemented",
    "outcome_of",
    "raised_at",
    "raised_in_derivative",
]

#: (text found in torch's message or its causes, what is missing, how to add it): errors
#: that say the function does not offer a capability, not that it computes something wrong.
_CAPABILITY_GAPS: tuple[tuple[str, str, str], ...] = (
    (
        "must implement the jvp function",
        "Function has no jvp: forward-mode AD (torch.func.jvp, jacfwd, check_forward_ad) is "
        "unsupported",
        "define a jvp staticmethod and save what it needs with ctx.save_for_forward",
    ),
    (
        "override the setup_context staticmethod",
        "Function lacks setup_context: torch.func transforms (vmap, grad, jacrev) cannot use it",
        "write forward(*args) without ctx plus a setup_context(ctx, inputs, output) "
        "staticmethod, and set generate_vmap_rule = True",
    ),
    (
        "does not have vmap support",
        "Function has no vmap rule: torch.func.vmap cannot batch it",
        "set generate_vmap_rule = True (or write a vmap staticmethod)",
    ),
    (
        "differentiate twice",
        "backward is once_differentiable: double backward is unsupported",
        "drop @once_differentiable and write backward in differentiable torch ops",
    ),
    (
        "marked as dirty during the forward method were not returned",
        "PyTorch's generated vmap rule (generate_vmap_rule = True) does not support a "
        "Function that modifies its input in place (mark_dirty)",
        "write a vmap staticmethod instead of generate_vmap_rule = True",
    ),
    (
        "which will be updated in place, were not batched",
        "torch.func.vmap cannot batch a batch norm that updates its running statistics in "
        "place (training mode; a PyTorch limitation)",
        "call .eval() first, or torch.func.replace_all_batch_norm_modules_(model), or build "
        "the norm with track_running_stats=False",
    ),
    (
        "in extra_args that has more elements than `self`",
        "vmap cannot batch an in-place write of a batched tensor into one that is not "
        "batched (e.g. a backward's torch.zeros_like(x).scatter_(dim, index, grad), with "
        "only grad batched: autograd.grad(is_grads_batched=True), "
        "jacobian(vectorize=True), jacrev)",
        "write it with the out-of-place op (torch.zeros_like(x).scatter(dim, index, grad), "
        "index_put, masked_scatter)",
    ),
    (
        "no autograd formula was registered",
        "the custom op has no backward formula: autograd is unsupported",
        "call op.register_autograd(backward, setup_context=...)",
    ),
    (
        "no fake impl registered",
        "the custom op has no fake (meta) implementation: torch.compile and export cannot trace it",
        "register a shape-only implementation with @op.register_fake",
    ),
)

#: (text found in torch's message or its causes, what it means and how to fix it: a
#: function making the text where it names an option)
_EXPLANATIONS: tuple[tuple[str, str | Callable[[], str]], ...] = (
    (
        "override the setup_context staticmethod",
        "Function lacks setup_context: torch.func transforms cannot use it (write "
        "forward(*args) without ctx plus a setup_context(ctx, inputs, output) staticmethod)",
    ),
    (
        "does not have vmap support",
        "Function has no vmap rule: set generate_vmap_rule = True (or write a vmap staticmethod)",
    ),
    (
        "must implement the jvp function",
        "Function has no jvp: forward-mode AD (torch.func.jvp, jacfwd, check_forward_ad) is "
        "unsupported",
    ),
    (
        "differentiate twice",
        "backward is not differentiable: double backward unsupported (once_differentiable?)",
    ),
    (
        "Expected backward function to handle undefined output grads",
        "backward does not handle undefined output gradients: treat a None grad_output as "
        "zeros (or return None for it)",
    ),
    (
        "Expected all input grads to be undefined or zero",
        "backward returns non-zero gradients when every output gradient is undefined/zero",
    ),
    (
        "Unsupported custom jvp",
        "torch.compile cannot capture a Function that defines jvp (a PyTorch limitation): "
        "use a jvp-free twin class when torch.compiler.is_compiling()",
    ),
    (
        "refers to a single memory location",
        "backward writes in place into grad_output, which may be an expanded (stride-0) "
        "tensor: never modify grad_output in place",
    ),
    (
        "view size is not compatible with input tensor's size and stride",
        "fn or its backward calls .view() on a non-contiguous tensor (e.g. a transposed "
        "input or grad_output): use .reshape()",
    ),
    (
        "a leaf Variable that requires grad",
        "fn writes in place into a differentiable input without telling autograd: write "
        "into a copy, or do it inside an autograd.Function that declares it with "
        "ctx.mark_dirty and returns the input",
    ),
    (
        "modified by an inplace operation",
        "a tensor saved for backward was modified in place before backward ran",
    ),
    (
        "returned an incorrect number of gradients",
        "backward returned the wrong number of gradients: return one per forward input "
        "(None for non-tensor or non-differentiable inputs)",
    ),
    (
        "Backward is not reentrant",
        lambda: (  # spelled when the message is made: --nondet-tol from torchbp-verify
            "backward gives different gradients for the same input and grad_output on two "
            "runs: it reads memory it never wrote (torch.empty filled in part), keeps state "
            "between calls, draws random numbers in backward without restoring the "
            "generator state forward drew from, or sums in an order that changes between "
            f"runs (atomic adds on CUDA: if so, pass {option_name('nondet_tol')}, as to "
            "torch's gradcheck)"
        ),
    ),
    (
        "tangent have the same layout as primal",
        "forward returns a view of an input (x.narrow, x[..., :k], x.t()) and jvp returned "
        "a view of the input's tangent that is not the same view (another offset, shape or "
        "strides: a wrong slice?): return the same view of the tangent (t.narrow(-1, 0, k) "
        "for x.narrow(-1, 0, k))",
    ),
    (
        "has_fw_view",
        "jvp returned a view of a tangent (e.g. tangent.expand(...)) for an output that is not "
        "a view: return a new tensor (e.g. add .clone())",
    ),
    (
        "does not require grad and does not have a grad_fn",
        "an output or gradient is detached from the graph (computed under no_grad, "
        ".detach() or once_differentiable)",
    ),
)


def capability_gap(exc: BaseException) -> tuple[str, str] | None:
    """``(what is missing, how to add it)`` when ``exc`` says a capability is missing.

    Args:
        exc: an exception raised while a check ran (its causes are searched too).

    Returns:
        The missing capability and a one-line fix, or None when ``exc`` is not one of the
        known "not supported" errors (then it is a failure).

    Examples:
        >>> capability_gap(RuntimeError("... must implement the jvp function ..."))[1][:25]
        'define a jvp staticmethod'
    """
    full = _message_chain(exc)
    for needle, missing, how_to_add in _CAPABILITY_GAPS:
        if needle in full:
            return missing, how_to_add
    value_read = _value_read_under_vmap(exc)
    if value_read is not None:
        return value_read
    if "flat_bdims must not be None" in full and _raised_in(exc, _GENERATED_VMAP_RULE):
        return (
            "PyTorch's generated vmap rule (generate_vmap_rule = True) cannot batch this "
            "Function (it fails on integer outputs such as indices)",
            "write a vmap staticmethod instead of generate_vmap_rule = True",
        )
    return None


#: How torch.func.vmap's own error for reading a batched tensor's values into Python
#: begins (``.item()``, or ``bool()`` of it in an ``if``).
_VMAP_VALUE_READ = "vmap: It looks like you're"

#: What the error names, by the words it uses for each.
_ITEM, _CONTROL_FLOW = "calling .item() on a Tensor", "data-dependent control flow"


def _value_read_under_vmap(exc: BaseException) -> tuple[str, str] | None:
    """``(what is missing, how to add it)`` when ``exc`` is torch.func.vmap's own
    ``RuntimeError`` for fn reading a batched tensor's values into Python: an ``.item()``
    or a Python ``if`` on ``bool(x.any())`` (an input check). Under vmap one call of fn sees
    the whole batch, which has no single Python value: a limitation of vmap, not a wrong
    result (a vmap giving wrong values fails the check's comparison). None for any other
    error, also one fn raised while handling vmap's (a fallback of fn's that fails)."""
    text = str(exc)
    if type(exc) is not RuntimeError or not text.startswith(_VMAP_VALUE_READ):
        return None
    item, control_flow = _ITEM in text, _CONTROL_FLOW in text
    if item and control_flow:  # vmap(grad) of a Function says "either (1) ... or (2)"
        what = ".item() or a Python if on a tensor's values (vmap does not say which)"
    elif item:
        what = ".item() (a Python number read off a tensor's values)"
    elif control_flow:
        what = "a Python if on a tensor's values (bool(x.any()), a check raising for bad inputs)"
    else:
        return None
    return (
        f"torch.func.vmap cannot run {what} in fn's forward or backward: one call sees "
        "the whole batch, which has no single Python value (a PyTorch limitation, not a "
        "wrong result)",
        "keep the values tensors - torch.where for a branch, x.abs().amax() rather than "
        "x.abs().max().item() for a number, a check of the inputs outside fn - or write a "
        "vmap staticmethod",
    )


#: The function of PyTorch that runs a Function's generated vmap rule (found by name in a
#: traceback: an assertion raised there is PyTorch's limitation, not the Function's bug).
_GENERATED_VMAP_RULE = "custom_function_call_vmap_generate_rule"


def _raised_in(exc: BaseException, function_name: str) -> bool:
    """True if ``exc`` passed through a frame of a function called ``function_name``."""
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_name == function_name:
            return True
        tb = tb.tb_next
    return False


def not_implemented(exc: BaseException) -> Exception | None:
    """The ``NotImplementedError`` that ``exc`` is or was caused by (up to four causes
    deep), or a ``RuntimeError`` there whose first line says "not implemented" (``raise
    RuntimeError("double backward is not implemented")``, as many Functions write it), or
    None: the error a function raises to say it does not offer something."""
    return next((e for e in _chain(exc) if _says_not_implemented(e)), None)


#: torch's dispatcher's words for a kernel missing for a dtype (``"softmax_lastdim_kernel_impl"
#: not implemented for 'Long'``): raised in the caller's code, a crash of a rule fn has
#: (an integer tensor where a float one was meant), not a capability fn says it lacks.
KERNEL_MISSING_FOR_A_DTYPE = re.compile(r"not implemented for '[^']+'")


def _says_not_implemented(exc: BaseException) -> bool:
    """True for a ``NotImplementedError``, or a ``RuntimeError`` whose first line says
    "not implemented" or "not yet implemented"; False for either saying a kernel is
    missing for a dtype (:data:`KERNEL_MISSING_FOR_A_DTYPE`) in the caller's code."""
    line = first_line(str(exc)).lower()
    if KERNEL_MISSING_FOR_A_DTYPE.search(line) and raised_at(exc) is not None:
        return False
    if isinstance(exc, NotImplementedError):
        return True
    return isinstance(exc, RuntimeError) and (
        "not implemented" in line or "not yet implemented" in line
    )


def outcome_of(
    exc: BaseException, context: str = "", capability: tuple[str, str] | None = None
) -> CheckFailure | CheckUnsupported:
    """The exception a check raises for ``exc``: unsupported for a missing capability,
    else a failure whose message is ``context`` followed by :func:`explain_error`.

    Args:
        exc: the exception caught while the check ran.
        context: what was being done, e.g. ``"vmap of the forward failed: "``.
        capability: ``(name, how to add it)`` of the optional capability the check
            exercises, e.g. ``("double backward", "write backward in ...")``: a
            ``NotImplementedError`` (or a ``RuntimeError`` saying "not implemented")
            raised while exercising it says it is absent (unsupported). Without it, such
            an error is a failure.

    Examples:
        >>> type(outcome_of(RuntimeError("boom"), "backward failed: ")).__name__
        'CheckFailure'
        >>> gap = outcome_of(NotImplementedError("no"), capability=("double backward", "add it"))
        >>> gap.message
        'double backward raised NotImplementedError: no; to add it: add it'
    """
    gap = capability_gap(exc)
    if gap is not None:
        return CheckUnsupported(*gap)
    missing = not_implemented(exc) if capability is not None else None
    if missing is not None:
        name, how_to_add = capability
        return CheckUnsupported(
            f"{name} raised {type(missing).__name__}: {first_line(str(missing))}", how_to_add
        )
    return CheckFailure(f"{context}{explain_error(exc)}")


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and up to four of its causes (explicit, else implicit), outermost first."""
    chain = [exc]
    cause = exc.__cause__ or exc.__context__
    while cause is not None and len(chain) < 5:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    return chain


def _message_chain(exc: BaseException) -> str:
    """The messages of ``exc`` and of up to four of its causes, one per line."""
    return "\n".join(str(e) for e in _chain(exc))


def first_line(text: str, limit: int = 240) -> str:
    """The first non-blank line of ``text``, cut to ``limit`` characters.

    Examples:
        >>> first_line("\\n  Jacobian mismatch for output 0\\n details")
        'Jacobian mismatch for output 0'
    """
    lines = [ln.strip() for ln in str(text).strip().splitlines() if ln.strip()]
    line = lines[0] if lines else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


#: autograd's refusal of a gradient backward returned: its position and what is wrong
#: (``got [2] but expected shape compatible with [3]``, ``expected device cpu but got meta``)
_INVALID_GRADIENT = re.compile(r"returned an invalid gradient at index (\d+) - ([^\n]*)")
_WRONG_DEVICE = re.compile(r"expected device (\S+) but got (\S+)")


#: autograd's refusal of a gradient for a forward argument that is not a tensor (a Python
#: number): the Function's name and the argument's position, counted from 1
_NON_TENSOR_GRADIENT = re.compile(
    r"function (\w+) returned a gradient different than None at position (\d+)"
)


def _non_tensor_gradient(full: str) -> str | None:
    """The plain-word message for autograd's refusal of a gradient returned for an argument
    that is not a tensor, naming the input (from 0, as the other messages do), or None."""
    found = _NON_TENSOR_GRADIENT.search(full)
    if found is None:
        return None
    function = found.group(1).removesuffix("Backward")
    index = int(found.group(2)) - 1
    return (
        f"{function}'s backward returned a gradient for input {index}, which is not a tensor "
        "(a Python number or other non-tensor argument): return None in its place"
    )


def _invalid_gradient(full: str) -> str | None:
    """The plain-word message for autograd's "returned an invalid gradient" error (a
    gradient of the wrong shape or on the wrong device), or None for another error."""
    found = _INVALID_GRADIENT.search(full)
    if found is None:
        return None
    index, detail = found.group(1), found.group(2).strip()
    device = _WRONG_DEVICE.search(detail)
    if device is not None:
        return (
            f"backward returned a gradient on device {device.group(2)} for input {index}, "
            f"which is on {device.group(1)}: return it on the input's device "
            "(e.g. .to(x.device))"
        )
    if "expected shape" in detail:
        return (
            f"backward returned a gradient for input {index} whose shape cannot be summed "
            f"to its input's shape ({detail})"
        )
    return f"backward returned an invalid gradient for input {index} ({detail})"


def explain_error(exc: BaseException) -> str:
    """Turn an exception raised by torch while checking into a one-line plain-word message.

    Args:
        exc: the exception.

    Returns:
        A known cause with its fix where the message (or one of its causes) is recognised;
        otherwise ``"<ExceptionType>: <first line>"``, plus Dynamo's explanation if any.

    Examples:
        >>> explain_error(RuntimeError("... must override the setup_context staticmethod ..."))[:33]
        'Function lacks setup_context: tor'
    """
    text = str(exc)
    full = _message_chain(exc)
    invalid = _invalid_gradient(full) or _non_tensor_gradient(full)
    if invalid is not None:
        return invalid
    for needle, known in _EXPLANATIONS:
        if needle in full:
            return known() if callable(known) else known
    message = f"{type(exc).__name__}: {first_line(text)}"
    if "Explanation:" in text:  # Dynamo errors put the cause on a later line
        explanation = text.split("Explanation:", 1)[1].strip().split(". ")[0]
        message += f" ({first_line(explanation, 200)})"
    none_grads = _none_grad_outputs(exc)
    if none_grads:
        message += (
            f" (backward was given None for {', '.join(none_grads)}: with "
            "ctx.set_materialize_grads(False) the gradient of an output that was not used "
            "is None - treat it as zeros)"
        )
    return message


def _none_grad_outputs(exc: BaseException) -> list[str]:
    """The grad_outputs that were None in the innermost Function ``backward`` that ``exc``
    was raised through, by name (``grads[1]`` for ``*grads``), when ``exc`` is the error
    of using a None (a TypeError or AttributeError about ``NoneType``); else none: a
    backward that handled its None grad_outputs and failed otherwise is not blamed."""
    if not isinstance(exc, TypeError | AttributeError) or "NoneType" not in str(exc):
        return []
    frames = [frame for frame in _frames(exc) if _is_backward(frame)]
    if not frames:
        return []
    return [name for name, value in _grad_outputs(frames[-1]) if value is None]


def _frames(exc: BaseException) -> Iterator[FrameType]:
    """The frames ``exc`` was raised through, outermost first."""
    tb = exc.__traceback__
    while tb is not None:
        yield tb.tb_frame
        tb = tb.tb_next


def _is_backward(frame: FrameType, names: frozenset[str] = frozenset({"backward"})) -> bool:
    """Whether ``frame`` runs an autograd.Function's ``backward`` (or another of its
    staticmethods named in ``names``): a function of that name whose first argument is
    the Function's ctx, whatever its name."""
    code = frame.f_code
    if code.co_name not in names or code.co_argcount < 1:
        return False
    first = frame.f_locals.get(code.co_varnames[0])
    return isinstance(first, torch.autograd.function.FunctionCtx)


#: The staticmethods of a Function that compute derivatives (``vjp`` is ``backward``'s
#: other name).
_DERIVATIVES = frozenset({"backward", "vjp", "jvp"})


def raised_in_derivative(exc: BaseException) -> bool:
    """Whether ``exc`` was raised in a Function's ``backward``, ``vjp`` or ``jvp`` (or in
    what one called), not in a forward: an error there is the derivative's, whatever
    its type, never fn refusing its inputs.

    Examples:
        >>> raised_in_derivative(ValueError("x must be positive"))
        False
    """
    return any(_is_backward(frame, _DERIVATIVES) for frame in _frames(exc))


def _grad_outputs(frame: FrameType) -> list[tuple[str, Any]]:
    """``(name, value)`` of each grad_output argument of a ``backward`` frame: the
    positional ones after ctx, then those of ``*grads``."""
    code, values = frame.f_code, frame.f_locals
    named = [(n, values.get(n)) for n in code.co_varnames[1 : code.co_argcount]]
    if code.co_flags & inspect.CO_VARARGS:
        varargs = code.co_varnames[code.co_argcount + code.co_kwonlyargcount]
        named += [(f"{varargs}[{i}]", v) for i, v in enumerate(values.get(varargs, ()))]
    return named


def _folder(path: str | Path) -> str:
    """``path`` resolved, ending with a separator (a prefix of the files inside it only)."""
    return str(Path(path).resolve() / "_")[:-1]


#: Folders whose code is not the caller's: torch's and torchbp.verify's own; and Python's
#: standard library, but not the packages installed inside it (``site-packages`` lies in
#: the standard library's folder in a conda environment).
_TORCH_AND_VERIFY = (_folder(Path(torch.__file__).parent), _folder(Path(__file__).parents[1]))
_STDLIB = _folder(sysconfig.get_paths()["stdlib"])
_INSTALLED = tuple({_folder(sysconfig.get_paths()[k]) for k in ("purelib", "platlib")})


def _callers_code(filename: str) -> bool:
    """Whether a traceback frame of the file ``filename`` runs the caller's code (fn's,
    or a library it calls), not torch's, torchbp.verify's or Python's own."""
    if filename.startswith("<frozen"):
        return False
    path = str(Path(filename).resolve())
    if path.startswith(_TORCH_AND_VERIFY):
        return False
    return not path.startswith(_STDLIB) or path.startswith(_INSTALLED)


def raised_at(exc: BaseException) -> tuple[str, bool] | None:
    """Where in the caller's code ``exc`` was raised: the innermost frame of its traceback
    outside torch, Python's standard library and torchbp.verify, as ``"at ops.py:7 in
    forward: a, b = x.shape"``, and whether that line is a ``raise`` statement (fn
    refusing something on purpose) rather than an operation failing (a bug, or an
    argument the operation refuses); None when no frame is the caller's.

    Examples:
        >>> raised_at(ValueError("never raised")) is None
        True
    """
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if _callers_code(f.filename)]
    if not frames:
        return None
    frame = frames[-1]
    line = first_line(frame.line or "", 120)
    where = f"at {Path(frame.filename).name}:{frame.lineno} in {frame.name}"
    return (f"{where}: {line}" if line else where), line.startswith("raise ")
