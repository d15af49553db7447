"""Execution-mode queries: what the code running now may do with tensor values and buffers.

Fast paths and argument checks ask these before they look at values (a host sync, or
data-dependent control flow) or write into buffers of their own.

Public API only, with one exception: :func:`graph_retained` asks torch's
``torch._C._autograd._get_current_graph_task_keep_graph`` (looked up with ``getattr``;
without it the answer is the safe "retained"). No public API says whether the running
backward frees the graph, and the answer lets cross-entropy's backward hand its saved
``(N, C)`` gradient over, scaled in place, instead of allocating a second one: measured
(torch 2.13, CPU, N=4096, C=32768, float32, ``cross_entropy(...).backward()``), the
backward's peak RSS grows by 1 MiB with it and by 513 MiB (one logits-sized tensor)
without it.
"""

from __future__ import annotations

import torch
from torch.fx.experimental.proxy_tensor import get_proxy_mode

#: Whether Dynamo answers ``torch.compiler.is_exporting()`` by torch.export's flag: torch
#: 2.11's Dynamo (and torch's before it) folds it to True under every torch.compile.
_DYNAMO_READS_EXPORT_FLAG = tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 13)


def exporting() -> bool:
    """Whether :func:`torch.export.export` records the running code (strict or not).

    ``torch.compiler.is_exporting()``, except under Dynamo on a torch whose Dynamo folds it
    to True under every torch.compile (before 2.13): there it is False, so that
    torch.compile keeps the hand-written backward. The cost, on those torch only: a strict
    export (Dynamo) cannot be told from a compile, and its program's gradients through
    torchbp's layers are wrong (docs/ops.md: export with ``strict=False`` there).
    """
    if not torch.compiler.is_exporting():
        return False
    return _DYNAMO_READS_EXPORT_FLAG or not torch.compiler.is_dynamo_compiling()


def values_inspectable(t: torch.Tensor) -> bool:
    """Whether code may look at ``t``'s values or write into buffers of its own. Not while
    torch.compile or make_fx traces (:func:`compiling_or_tracing`); not on a tensor
    without values: a meta tensor, or a fake one (FakeTensorMode, as torch's shape and
    memory estimates and make_fx's fake and symbolic tracing use), whose storage is on the
    meta device; not on a tensor without storage (:func:`has_storage`): torch.func-wrapped
    or batched, where data-dependent control flow and in-place writes mixing batched and
    plain tensors are illegal, or sparse; and not while a CUDA graph is being captured on
    the current stream, where a host sync is illegal."""
    return not compiling_or_tracing() and _has_values(t)


def compiling_or_tracing() -> bool:
    """Whether torch.compile traces the running code, or ``make_fx`` records it with real
    tensors (its default ``tracing_mode="real"``, which ``torch.func.linearize`` runs): a
    value read there (``.item()``, ``int()``) is refused ("trying to get value out of a
    tracing tensor"), and an ``out=`` op is recorded into a graph that refuses it when
    replayed on inputs that require grad.

    make_fx is asked itself (``get_proxy_mode()``, ~0.4 us). Its dispatch mode reaches
    the autograd engine's device threads (CUDA's backward), so the answer holds there too.
    (Asking only while the autocast cache is off, as make_fx turns it off, saved ~0.4 us
    per query but missed a region that turns the cache back on inside the trace:
    ``torch.autocast(..., cache_enabled=True)``, the deprecated
    ``torch.cpu.amp.autocast(enabled=False)``; and that flag is not seen on device
    threads.)"""
    return torch.compiler.is_compiling() or make_fx_tracing()


def make_fx_tracing() -> bool:
    """Whether ``make_fx`` (any ``tracing_mode``; ``torch.func.linearize`` runs it) records
    the running code: its proxy mode is active, on this thread or, carried by autograd, on
    the engine's device thread."""
    return get_proxy_mode() is not None


def _has_values(t: torch.Tensor) -> bool:
    """:func:`values_inspectable` but for the :func:`compiling_or_tracing` check, which
    callers asking about several tensors make once."""
    storage = _storage(t)
    if storage is None or _on_meta(t, storage):
        return False
    return t.is_cpu or not (t.is_cuda and torch.cuda.is_current_stream_capturing())


def _on_meta(t: torch.Tensor, storage: torch.UntypedStorage) -> bool:
    """Whether ``t``'s storage is on the meta device. A plain ``torch.Tensor``'s storage is
    on its own device, so ``t.is_meta`` answers (a fifth of the cost of reading the
    storage's device, on each query of every call); a subclass's (a fake tensor, whose
    device is another) is looked at."""
    if type(t) is torch.Tensor:
        return t.is_meta
    return storage.device.type == "meta"


def has_storage(t: torch.Tensor) -> bool:
    """Whether ``t`` owns memory: not a tensor that torch.func wraps (``vmap``, ``grad``,
    ``jvp``, ``vjp``, ``jacrev``, ``jacfwd``) or batches (also the legacy batching of
    ``autograd.grad(is_grads_batched=True)``, gradcheck's ``check_batched_grad``), which
    stands for another tensor, nor a sparse one; every such tensor refuses
    ``untyped_storage()``. Meta, fake, nested and subclass tensors have storage, and so
    does ``torch.func.functionalize``'s wrapper (which runs no autograd.Function at all)."""
    return _storage(t) is not None


def any_without_storage(args) -> bool:
    """Whether any tensor among ``args`` (other values skipped) lacks storage
    (:func:`has_storage`). A plain loop: it runs on every Function call, where a generator
    in ``any`` costs more than the checks themselves."""
    for t in args:
        if isinstance(t, torch.Tensor) and _storage(t) is None:
            return True
    return False


def _storage(t: torch.Tensor) -> torch.UntypedStorage | None:
    try:
        return t.untyped_storage()
    except (NotImplementedError, RuntimeError):
        return None


def shares_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` view one storage (``b.detach()``, a row of ``b``, ...), so
    that writing into ``b`` may change ``a``. Both must have storage (:func:`has_storage`)."""
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def carries_tangent(t: torch.Tensor) -> bool:
    """Whether ``t`` is a forward-mode AD dual tensor (a tangent rides on it): then every
    op on it is differentiated, even with grad mode off (forward-over-reverse:
    ``torch.autograd.grad`` of dual inputs)."""
    return torch.autograd.forward_ad.unpack_dual(t).tangent is not None


def dense(t: torch.Tensor) -> bool:
    """Whether ``t`` is an ordinary dense tensor: strided, not nested. The fast kernels'
    ``out=`` and in-place ops, and their flat views, exist only for those; a nested
    tensor (``torch.jagged`` or strided layout) has storage but takes none of them. Ask
    it after :func:`values_inspectable`: torch.compile's strict tracing of a backward
    refuses to read ``layout``."""
    return t.layout == torch.strided and not t.is_nested


def first_order_eager(*tensors: torch.Tensor) -> bool:
    """Whether a backward reading ``tensors`` (the incoming gradient ``g`` and what it
    saved) runs first-order and eagerly (grad mode off, no torch.func wrapper, not
    compiling nor traced by make_fx, no forward-mode AD tangent on any of them) on
    :func:`dense` tensors: then nothing differentiates its result, and a fast kernel with
    in-place ops may compute it."""
    if torch.is_grad_enabled() or compiling_or_tracing():
        return False
    # a plain loop, each question once: this runs in every activation's backward, where
    # a generator in ``all`` and a compile check per tensor cost more than the answers
    for t in tensors:
        if not (_has_values(t) and dense(t) and not carries_tangent(t)):
            return False
    return True


def graph_retained() -> bool:
    """Whether the running backward keeps the graph (``retain_graph=True``); ``True`` when
    this torch cannot tell, which is the safe answer."""
    if _keep_graph is None:
        return True
    try:
        return bool(_keep_graph())
    except RuntimeError:  # no backward is running (a node's apply called directly)
        return True


def may_reuse_saved(*tensors: torch.Tensor) -> bool:
    """Whether backward may scale a buffer it saved (and owns) in place and hand it over as
    the gradient: only for a first-order eager backward that frees the graph afterwards,
    so nothing can read the buffer again, and that no forward-mode AD differentiates
    (an in-place op, then detached, would drop the tangent)."""
    return (
        not torch.is_grad_enabled()
        and all(values_inspectable(t) and not carries_tangent(t) for t in tensors)
        and not graph_retained()
    )


# The one private torch name this module uses (see the module docstring), feature-tested.
_keep_graph = getattr(
    getattr(torch._C, "_autograd", None), "_get_current_graph_task_keep_graph", None
)
