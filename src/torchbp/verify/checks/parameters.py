"""The parameters of an ``nn.Module`` fn, differentiated as inputs: a Function inside the
module with a wrong weight gradient must fail the checks, as one with a wrong input
gradient does.

Each parameter that requires grad becomes one more input after the caller's, and fn and
the reference are called through :func:`torch.func.functional_call`, which runs the module
with the checks' tensors in place of its parameters (the module itself is not changed)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = ["differentiated_parameters", "module_of", "require_initialized", "with_parameters"]


def differentiated_parameters(fn: Any) -> list[tuple[str, torch.Tensor]]:
    """``(name, parameter)`` of each floating parameter of the :func:`module_of` fn that
    requires grad; empty for a fn that is no module's.

    Examples:
        >>> [name for name, _ in differentiated_parameters(torch.nn.Linear(2, 3))]
        ['weight', 'bias']
        >>> differentiated_parameters(torch.tanh)
        []
    """
    module = module_of(fn)
    if module is None:
        return []
    return [
        (name, p)
        for name, p in module.named_parameters()
        if p.requires_grad and p.is_floating_point()
    ]


def module_of(fn: Any) -> torch.nn.Module | None:
    """The ``nn.Module`` that fn calls: fn itself, the object of a bound method
    (``model.forward``) or, through ``functools.partial`` (binding a keyword argument),
    the module of the partial's function; None for any other fn.

    Examples:
        >>> import functools
        >>> linear = torch.nn.Linear(2, 3)
        >>> module_of(functools.partial(linear.forward)) is linear
        True
    """
    while isinstance(fn, functools.partial):
        fn = fn.func
    for owner in (fn, getattr(fn, "__self__", None)):
        if isinstance(owner, torch.nn.Module):
            return owner
    return None


def require_initialized(role: str, fn: Any) -> None:
    """Refuse the :func:`module_of` fn when it is a lazy module (``nn.LazyLinear``) not
    yet initialized: its parameters have no shape to differentiate or to compare with.

    Raises:
        ValueError: naming ``role`` (``"fn"``, ``"reference"``) and the parameters.
    """
    module = module_of(fn)
    if module is None:
        return
    tensors = [*module.named_parameters(), *module.named_buffers()]
    lazy = [name for name, t in tensors if torch.nn.parameter.is_lazy(t)]
    if lazy:
        raise ValueError(
            f"check_function: {role} is an nn.Module with uninitialized parameters "
            f"({', '.join(lazy)}): a lazy module; call it once on an example input to "
            "initialize them, then check it"
        )


class _Calling(torch.nn.Module):
    """Calls ``call`` with ``modules`` as submodules, so that ``functional_call`` on it
    puts tensors in place of their parameters while ``call`` runs."""

    def __init__(self, modules: dict[str, torch.nn.Module], call: Callable[..., Any]):
        super().__init__()
        for key, module in modules.items():
            self.add_module(key, module)
        self.calls = [call]  # a list: not registered as a submodule a second time

    def forward(self, *args: Any) -> Any:
        return self.calls[0](*args)


def _same_parameters(
    module: torch.nn.Module, other: torch.nn.Module | None, names: Sequence[str]
) -> bool:
    """Whether ``other`` is another ``nn.Module`` with parameters of the same names and
    shapes as ``module``'s ``names`` (a reference ``nn.Linear`` beside a custom linear)."""
    if other is None or other is module:
        return False
    mine, theirs = dict(module.named_parameters()), dict(other.named_parameters())
    return all(n in theirs and theirs[n].shape == mine[n].shape for n in names)


def _through(
    modules: dict[str, torch.nn.Module], call: Callable[..., Any], names: Sequence[str], n: int
) -> Callable[..., Any]:
    """``call`` of the first ``n`` arguments, with the rest in place of the parameters
    ``names`` of each of ``modules``."""
    holder = _Calling(modules, call)

    def called(*args: Any) -> Any:
        swapped = {f"{key}.{name}": p for key in modules for name, p in zip(names, args[n:])}
        return torch.func.functional_call(holder, swapped, tuple(args[:n]))

    return called


def with_parameters(
    fn: Callable[..., Any], reference: Callable[..., Any] | None, n_inputs: int
) -> tuple[Callable[..., Any], Callable[..., Any] | None, list[str]]:
    """fn and the reference as functions of the ``n_inputs`` inputs followed by the
    :func:`differentiated_parameters` of fn, and the parameters' names.

    The reference runs with the checks' tensors in place of fn's parameters (a reference
    that reads them, ``lambda x: x @ model.weight.T``, follows them) and of its own when it
    is a module with parameters of the same names and shapes (``nn.Linear`` beside a custom
    linear module).
    """
    named = differentiated_parameters(fn)
    module = module_of(fn)
    if not named or module is None:
        return fn, reference, []
    names = [name for name, _ in named]
    checked = _through({"module": module}, fn, names, n_inputs)
    if reference is None:
        return checked, None, names
    modules = {"module": module}
    reference_module = module_of(reference)
    if _same_parameters(module, reference_module, names):
        modules["reference"] = reference_module
    return checked, _through(modules, reference, names, n_inputs), names
