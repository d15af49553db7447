""":class:`CheckContext`: what every check reads (the function, prepared inputs, reference,
dtype, device, options) and what one check leaves for a later one."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from torchbp.verify.checks.compare import float_tensors, tolerances
from torchbp.verify.report import FAIL, CheckResult

if TYPE_CHECKING:
    from torchbp.verify.checks.options import Options

__all__ = ["FULL_JACOBIAN_ELEMENTS", "CheckContext", "generator_copy"]

#: The most differentiated elements (inputs and an ``nn.Module``'s parameters together)
#: whose Jacobians torch's gradcheck builds in full by default; above it the numerical
#: checks compare random projections (``fast_mode``), as a full numerical Jacobian costs
#: two forward calls per element and memory for (input elements x output elements) entries
#: (a (256, 512) input of an element-wise fn: 137 GB).
FULL_JACOBIAN_ELEMENTS = 4096


def generator_copy(generator: torch.Generator) -> torch.Generator:
    """A new generator on ``generator``'s device in its state: it draws the same numbers,
    and drawing from it leaves ``generator`` where it was."""
    copy = torch.Generator(device=generator.device)
    copy.set_state(generator.get_state())
    return copy


def _fresh(arg: Any) -> Any:
    """A copy of a list or generator input for one call (fn may change either), else
    ``arg`` itself."""
    if isinstance(arg, list):
        return list(arg)
    if isinstance(arg, torch.Generator):
        return generator_copy(arg)
    return arg


def _leave_out(out: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``out`` with 0 where ``mask`` (its constant infinities) is true, and derivative 0
    there too: fn's derivatives at those elements are left out of a comparison with central
    differences, which cannot measure them (``inf - inf``). Nor can anything else but a
    reference: autograd gives a score masked with ``masked_fill(mask, -inf)`` derivative
    0 and one masked by adding a ``-inf`` mask derivative 1 (add's), and the two functions
    are equal everywhere."""
    return torch.where(mask, 0.0, out)


@dataclass(eq=False)
class CheckContext:
    """The function under test on its prepared inputs, shared by the checks of one run.

    Args:
        fn: the callable under test (a Function's ``apply``).
        args: the prepared positional inputs (cast, moved and detached).
        grad_idx: positions in ``args`` of the inputs that get gradients.
        reference: the callable ``fn`` must match, or None.
        options: the validated options of ``check_function``.
        custom_op: the ``torch.library`` custom op ``fn`` is, or None.
    """

    fn: Callable[..., Any]
    args: list[Any]
    grad_idx: list[int]
    reference: Callable[..., Any] | None
    options: Options
    custom_op: Any | None = None
    #: Shapes of fn's floating-point outputs (set by the forward check, which runs first).
    out_shapes: list[tuple[int, ...]] = field(default_factory=list)
    #: Their dtypes (set by the forward check).
    out_dtypes: list[torch.dtype] = field(default_factory=list)
    #: Positions (in ``args``) of the tensor inputs fn modifies in place and returns
    #: (``ctx.mark_dirty``), differentiated or not (an ``out=`` buffer); set by the
    #: forward check. Every call gets fresh copies of them (non-leaf ones of grad inputs).
    dirty_inputs: frozenset[int] = frozenset()
    #: Whether fn returns a sparse tensor (made dense for the checks); set by the forward
    #: check.
    sparse_outputs: bool = False
    #: ``(the caller's dtype, the dtype fn is given)`` of each input the ``dtype`` option
    #: cast, by position (a fn that refuses the cast dtype is told how to keep its own).
    cast_from: dict[int, tuple[torch.dtype, torch.dtype]] = field(default_factory=dict)
    #: fn's positional arguments with those inputs in the caller's own dtypes again, for
    #: the ``reference_dtype`` check; None when nothing was cast, or fn or the reference
    #: holds tensors of the cast dtype (an ``nn.Module``'s parameters, a tensor in a
    #: closure: the calls would mix dtypes).
    own_dtype_args: list[Any] | None = None
    #: Positions of fn's complex inputs, which ``args`` holds as their real views (see
    #: ``checks.complex_views``); set by ``check_function``.
    complex_inputs: frozenset[int] = frozenset()
    #: ``"Name.vmap"`` when fn is the ``apply`` of a Function with its own ``vmap``
    #: staticmethod (a rule written by hand, not PyTorch's), else None; set by
    #: ``check_function``.
    own_vmap_rule: str | None = None
    #: The names of fn's module parameters differentiated as inputs, by position (in
    #: ``args``, after the caller's inputs; see ``checks.parameters``).
    parameter_names: dict[int, str] = field(default_factory=dict)
    #: Results of the checks that ran so far, by name (later checks may depend on them).
    results: dict[str, CheckResult] = field(default_factory=dict)
    #: Numerical Jacobian of :meth:`diff_fn`, computed once (see ``checks.numerical``).
    numerical_jacobian: list[list[torch.Tensor]] | None = None
    #: The differentiable inputs of the latest call of :meth:`diff_fn` that fn refused
    #: with a ``ValueError`` (central differences shifting two values fn needs sorted
    #: within eps of each other), or None; cleared before each check.
    refused_inputs: list[torch.Tensor] | None = None
    #: Per floating-point output of fn, where it is the same infinity at the given inputs
    #: and shifted by +-eps (a masked attention score of -inf), for :meth:`diff_fn` to
    #: leave out; set only while a check comparing with central differences of fn's
    #: outputs runs (``inf - inf`` is no difference quotient), else None.
    constant_infinities: list[torch.Tensor] | None = None
    #: The device of the inputs and the dtype of the differentiable ones.
    device: torch.device = field(init=False)
    dtype: torch.dtype = field(init=False)
    #: Seeded source of the random grad_outputs and projections (reseeded by every check).
    generator: torch.Generator = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.device = next(a.device for a in self.args if isinstance(a, torch.Tensor))
        self.dtype = self.args[self.grad_idx[0]].dtype
        self.generator = torch.Generator().manual_seed(int(self.options.seed))

    def failed(self, name: str) -> bool:
        """True if the check ``name`` already ran and failed."""
        result = self.results.get(name)
        return result is not None and result.status == FAIL

    def randn(self, shape: torch.Size | Sequence[int], dtype: torch.dtype | None = None):
        """Seeded standard-normal values (drawn in float64, then cast) on fn's device."""
        t = torch.randn(tuple(shape), generator=self.generator, dtype=torch.float64)
        return t.to(device=self.device, dtype=dtype or self.dtype)

    def randn_like_outputs(self, outs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """One random grad_output per output, of its shape and dtype."""
        return [self.randn(o.shape, o.dtype) for o in outs]

    def leaves(self) -> list[torch.Tensor]:
        """Fresh differentiable copies of the grad inputs."""
        return [self.args[i].detach().clone().requires_grad_(True) for i in self.grad_idx]

    def sparse_gradient_inputs(self) -> list[int]:
        """Positions ``k`` of the dense grad inputs for which backward returns a sparse
        gradient (``nn.Embedding(sparse=True)`` style), found by one backward of ones;
        empty when fn or its backward raises (the checks report that themselves)."""
        diff = self.leaves()
        try:
            outs = [o for o in self.diff_fn(*diff) if o.requires_grad]
            ones = [torch.ones_like(o) for o in outs]
            grads = torch.autograd.grad(outs, diff, ones, allow_unused=True) if outs else ()
        except Exception:  # noqa: BLE001 - the checks report fn's own error
            return []
        return [
            k
            for k, (g, x) in enumerate(zip(grads, diff))
            if g is not None and g.layout != torch.strided and x.layout == torch.strided
        ]

    def full_inputs(
        self, diff: Sequence[torch.Tensor], copied: frozenset[int] | None = None
    ) -> list[Any]:
        """fn's positional inputs, with ``diff`` in place of the grad inputs, a fresh copy
        of each tensor at the positions ``copied`` (by default those fn modifies in place,
        so that no call sees what another wrote and the tensors it was given stay intact)
        and of each list input (for the same reason), and a copy of each ``torch.Generator``
        in its initial state (every call of a random fn given one draws the same numbers,
        as a call given the same seed does)."""
        copied = self.dirty_inputs if copied is None else copied
        full = [_fresh(a) for a in self.args]
        for i, t in zip(self.grad_idx, diff):
            full[i] = t
        return [a.clone() if i in copied else a for i, a in enumerate(full)]

    def call(self, fn: Callable[..., Any], diff: Sequence[torch.Tensor]) -> Any:
        """Call ``fn`` on :meth:`full_inputs` of ``diff``."""
        return fn(*self.full_inputs(diff))

    def diff_fn(self, *diff: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """fn of the differentiable inputs only, returning its floating-point outputs, with
        the elements :attr:`constant_infinities` marks left out (0, and so are their
        derivatives: see :func:`_leave_out`); a ``ValueError`` of fn leaves a copy of
        ``diff`` in :attr:`refused_inputs`."""
        try:
            outs = tuple(float_tensors(self.call(self.fn, diff)))
        except ValueError:
            self.refused_inputs = [d.detach().clone() for d in diff]
            raise
        if self.constant_infinities is None:
            return outs
        return tuple(
            _leave_out(out, mask) if mask.shape == out.shape else out
            for out, mask in zip(outs, self.constant_infinities)
        )

    def input_name(self, k: int) -> str:
        """How messages name the ``k``-th differentiable input, e.g. ``"input 0"``, or
        ``"parameter 'weight' (input 1)"`` for a module parameter."""
        i = self.grad_idx[k]
        name = self.parameter_names.get(i)
        return f"input {i}" if name is None else f"parameter {name!r} (input {i})"

    def parity_tolerances(self, dtype: torch.dtype | None = None) -> tuple[float, float]:
        """``(atol, rtol)`` for comparing two computations: :func:`tolerances` of ``dtype``
        (fn's dtype by default), unless the options override them."""
        atol, rtol = tolerances(dtype or self.dtype)
        if self.options.parity_atol is not None:
            atol = float(self.options.parity_atol)
        if self.options.parity_rtol is not None:
            rtol = float(self.options.parity_rtol)
        return atol, rtol
