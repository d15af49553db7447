"""The uses of autograd an open ``per_sample_grads`` context refuses from its hooks, and
their messages: a second backward, ``torch.autograd.grad`` with respect to a trainable
parameter, a gradient reaching a parameter through an op other than its Linear, a
backward after one cut short by an error, and (clip mode) a trainable parameter outside
the model feeding its output, used after it (in the loss), used by a reentrant
checkpoint's segment, or reached by a backward after the context (seen by
:class:`~torchbp.per_sample.outside_watch.OutsideParameterWatch`).

Each message starts with ``per_sample_grads:`` and says what to do instead.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointFunction

from torchbp.per_sample.recorder import running_on_this_thread

__all__ = [
    "autograd_grad_refusal",
    "inside_autograd_grad",
    "outside_parameters_guard",
    "passed_through_autograd_grad",
    "refuse_backward_after_one_cut_short",
    "refuse_checkpointed_outside_parameter",
    "refuse_exit_on_another_thread",
    "refuse_outside_parameter_after_the_context",
    "refuse_outside_parameter_gradient",
    "refuse_second_backward",
    "refuse_stray_gradient",
    "tensors_in",
    "walk_graph",
]

_AUTOGRAD_GRAD_CODE = torch.autograd.grad.__code__
# the class name torch gives a custom Function's graph nodes: its own, + "Backward"
_CHECKPOINT_NODE_NAME = f"{CheckpointFunction.__name__}Backward"


def refuse_second_backward() -> None:
    """Raise for a backward reaching the parameters after the recorded one.

    Raises:
        RuntimeError: always.
    """
    raise RuntimeError(
        "per_sample_grads: a second backward reached the model's parameters inside "
        "one context; a context records one backward: open a new one per step"
    )


def refuse_backward_after_one_cut_short() -> None:
    """Raise for a backward reaching the parameters after an earlier one that reached
    them and never completed (an error raised inside it, and caught).

    Raises:
        RuntimeError: always.
    """
    raise RuntimeError(
        "per_sample_grads: a backward reached the model's parameters after an "
        "earlier backward in this context was cut short by an error (caught) before "
        "it completed; the two cannot be told apart, so nothing is formed: open a "
        "new context for the step"
    )


def refuse_exit_on_another_thread() -> None:
    """Raise for ``__exit__`` on a thread other than the one that entered the context,
    whose recording and (clip mode) torch function mode are that thread's: left from
    here they would stay set there. Nothing is changed: the context stays open.

    Raises:
        RuntimeError: always, naming the way out.
    """
    raise RuntimeError(
        "per_sample_grads: a context must be left on the thread that entered it (its "
        "recording of the Linear calls and, in mode='clip', its torch function mode are "
        "that thread's); it stays open: leave it there, or enter and leave it in one "
        "with block on the thread that runs the step"
    )


def refuse_forward_on_another_thread(linear_name: str | None = None) -> None:
    """(clip mode) Raise for a forward of the model (or of its Linear ``linear_name``,
    called without the model's own call) whose output can join a graph, on a thread
    other than the one that entered the context: the torch function mode watching for
    trainable parameters outside the model is active on that thread only, so a loss
    computed here could give one an unclipped gradient, unseen.

    Raises:
        RuntimeError: always, naming the way out.
    """
    linear = "" if linear_name is None else f" (its Linear {linear_name!r} called there)"
    raise RuntimeError(
        "per_sample_grads: in mode='clip' the model's forward ran on a thread other than "
        f"the one that entered the context{linear}; the context watches for trainable parameters "
        "outside the model (which would get an unclipped gradient) with a torch function "
        "mode, active on its own thread only: run the step's forward, loss and backward "
        "on the thread of the with block (enter the context on the worker thread); an "
        "evaluation forward there under torch.no_grad() is let be"
    )


def refuse_stray_gradient(parameter_name: str, *, layer_recorded_a_call: bool) -> None:
    """Raise for a gradient that reached the parameter ``parameter_name`` through an op
    other than its Linear: inside the context the Linear backward hands dW, db to the
    recorder, not autograd.

    Args:
        parameter_name: ``"parameter 0.weight"``.
        layer_recorded_a_call: whether the parameter's Linear recorded a call in the
            context (the likely causes differ).

    Raises:
        RuntimeError: always, with the likely causes.
    """
    raise RuntimeError(
        f"per_sample_grads: {parameter_name} received a gradient from an op "
        f"other than its recorded Linear call ({_stray_gradient_hint(layer_recorded_a_call)}); "
        "that gradient cannot be attributed to samples"
    )


def _stray_gradient_hint(layer_recorded_a_call: bool) -> str:
    """The likely causes of a gradient reaching a parameter other than through its layer."""
    if layer_recorded_a_call:
        return (
            "is it used elsewhere, e.g. tied, passed to a functional op, or in a "
            "penalty term of the loss such as an L2 regularizer (use the optimizer's "
            "weight_decay instead) or a gradient penalty (an input gradient from "
            "torch.func.grad in the loss, which cannot be clipped per sample here: form "
            "such a loss's per-sample gradients with torch.func, "
            "vmap(grad(loss_of_one_sample)), and clip them yourself), or does the model "
            "run under torch.compile, which is not supported?"
        )
    return (
        "its Linear recorded no call in this context: was the forward run before the "
        "context was entered (run it inside), was the parameter passed to a functional "
        "op, or does the model run under torch.compile, which is not supported?"
    )


def autograd_grad_refusal(what: str) -> str:
    """The message refusing ``torch.autograd.grad`` with respect to ``what``."""
    return (
        f"per_sample_grads: torch.autograd.grad with respect to {what} is not supported "
        "inside the context, which forms the parameters' gradients after a backward, into "
        "p.grad; call loss.backward() inside the context and read p.grad, p.grad_sample or "
        "ps.norms (torch.autograd.grad with respect to inputs only is fine)"
    )


def inside_autograd_grad() -> bool:
    """Whether a call of ``torch.autograd.grad`` is on this thread's Python stack (a hook of
    a CPU backward runs on the calling thread; on a device's autograd thread this sees
    none, and the context's ``__exit__`` names torch's own refusal instead)."""
    return running_on_this_thread(_AUTOGRAD_GRAD_CODE)


def passed_through_autograd_grad(tb) -> bool:
    """Whether an exception's traceback ``tb`` runs through ``torch.autograd.grad``."""
    while tb is not None:
        if tb.tb_frame.f_code is _AUTOGRAD_GRAD_CODE:
            return True
        tb = tb.tb_next
    return False


def outside_parameters_guard(model: nn.Module, own_checkpoints: weakref.WeakSet) -> Callable:
    """A forward hook for ``model`` (clip mode) that refuses an output whose autograd graph
    reaches a trainable :class:`~torch.nn.Parameter` that is not one of the model's (a
    second model before it, or a parameter its forward uses without registering it): the
    backward would give that parameter an unclipped gradient, with no per-sample
    accounting, into its ``p.grad``, where an optimizer stepping it would leak what
    DP-SGD protects; and an input made by a reentrant activation checkpoint, whose
    parameters no graph shows. A copy of the model (``copy.deepcopy`` copies the hook) is
    let be, and so is a forward traced by ``torch.compile``, refused at the backward.
    Register it with ``with_kwargs=True``: it reads the inputs, by position or keyword.
    It adds to ``own_checkpoints`` the nodes of the reentrant checkpoints the model's own
    forwards ran (in an output's graph, not in that call's inputs')."""
    guarded = weakref.ref(model)
    # the model's parameters now, when the context is created: a forward whose leaves are
    # all among them is let be without listing the model's parameters again
    at_creation = {id(p): p for p in model.parameters()}
    # (own_checkpoints: in a later call's input, the model applied to its own output,
    # they are not checkpoints in front of it)

    def refuse_parameters_outside(
        module: nn.Module, args: tuple, kwargs: dict, output: object
    ) -> None:
        if module is not guarded():
            return
        if torch.compiler.is_compiling():
            # Dynamo cannot trace grad_fn (with fullgraph=True its error would replace
            # the context's own refusal of torch.compile, at the backward)
            return
        leaves, checkpoints = walk_graph(tensors_in(output))
        if checkpoints:
            _, before = walk_graph(tensors_in((args, kwargs)))
            if any(node not in own_checkpoints for node in checkpoints & before):
                _refuse_reentrant_checkpoint_in_front()
            own_checkpoints.update(checkpoints - before)
        others = [p for p in leaves if at_creation.get(id(p)) is not p]
        if not others:
            return
        # the model's parameters as they are now: one replaced, frozen or unfrozen since
        # the context was created is refused by name at the backward
        own = {id(p) for p in module.parameters()}
        for leaf in others:
            if id(leaf) not in own:
                raise RuntimeError(
                    f"per_sample_grads: the output of the model given to per_sample_grads "
                    f"depends on a trainable nn.Parameter of shape {tuple(leaf.shape)} that "
                    "is not one of the model's (another model run before it, or a parameter "
                    "its forward uses without registering it); in mode='clip' that parameter "
                    "would receive an unclipped gradient outside the per-sample accounting: "
                    "give per_sample_grads one module holding both (e.g. nn.Sequential), "
                    "freeze it (requires_grad_(False)), or detach what it produces"
                )

    return refuse_parameters_outside


def walk_graph(tensors: Iterable[torch.Tensor]) -> tuple[list[nn.Parameter], set]:
    """The trainable :class:`~torch.nn.Parameter` leaves whose gradient a backward from
    ``tensors`` accumulates, and the nodes of the reentrant activation checkpoints it
    passes (see :func:`_is_reentrant_checkpoint`). Each graph node is visited once and its
    ``next_functions`` (a tuple built at each read) read once; only a node without
    children can be a leaf's ``AccumulateGrad``."""
    leaves = []
    roots = []
    for tensor in tensors:
        if tensor.grad_fn is not None:
            roots.append(tensor.grad_fn)
        elif tensor.requires_grad:
            leaves.append(tensor)
    stack = list(dict.fromkeys(roots))
    seen = set(stack)
    checkpoints = set()
    while stack:
        node = stack.pop()
        children = node.next_functions
        if not children:
            leaves.append(getattr(node, "variable", None))  # an AccumulateGrad's tensor
            continue
        if _is_reentrant_checkpoint(node):
            checkpoints.add(node)
        for child, _ in children:
            if child is not None and child not in seen:
                seen.add(child)
                stack.append(child)
    return [t for t in leaves if isinstance(t, nn.Parameter) and t.requires_grad], checkpoints


def _is_reentrant_checkpoint(node) -> bool:
    """Whether the graph node ``node`` is a reentrant activation checkpoint's
    (``torch.utils.checkpoint`` with ``use_reentrant=True``): its backward recomputes the
    segment and runs a backward of its own through it, reaching parameters that its
    ``next_functions`` (the segment's inputs) do not show."""
    return type(node).__name__ == _CHECKPOINT_NODE_NAME


def _refuse_reentrant_checkpoint_in_front() -> None:
    """Refuse a reentrant checkpoint found in the graphs of both the model's output and
    its inputs, i.e. run before the model (and not by an earlier call of the model): the
    trainable parameters its segment uses would receive an unclipped gradient from its
    inner backward, unseen by the graph walk. (One inside the model, around its
    trainable Linears, is served: its calls are recorded.)

    Raises:
        RuntimeError: naming the checkpoint and the ways out.
    """
    raise RuntimeError(
        "per_sample_grads: the input of the model given to per_sample_grads comes from "
        "a reentrant activation checkpoint (torch.utils.checkpoint with "
        "use_reentrant=True), whose forward keeps no graph, so the trainable parameters "
        "it uses cannot be seen; in mode='clip' they would receive an unclipped "
        "gradient outside the per-sample accounting: use use_reentrant=False there "
        "(its graph is then checked), or detach what it produces; freezing what it "
        "trains is not enough while its input requires grad (the checkpoint's node is "
        "kept, and what it trains cannot be seen): then also detach its input"
    )


def tensors_in(output: object) -> Iterator[torch.Tensor]:
    """The tensors of ``output``: itself, or those in its tuples, lists, mapping values and
    dataclass fields (a model output class such as Hugging Face's ``ModelOutput``)."""
    if isinstance(output, torch.Tensor):
        yield output
    elif isinstance(output, (tuple, list)):
        for item in output:
            yield from tensors_in(item)
    elif isinstance(output, Mapping):
        for item in output.values():
            yield from tensors_in(item)
    elif dataclasses.is_dataclass(output) and not isinstance(output, type):
        for item in dataclasses.fields(output):
            yield from tensors_in(getattr(output, item.name, None))


def refuse_outside_parameter_gradient(p: nn.Parameter) -> None:
    """Raise for a trainable parameter outside the model that a clip-mode backward reached
    (see :class:`~torchbp.per_sample.outside_watch.OutsideParameterWatch`), before its
    unclipped gradient is written.

    Raises:
        RuntimeError: always, naming its shape and the ways out.
    """
    raise RuntimeError(
        f"per_sample_grads: a trainable nn.Parameter of shape {tuple(p.shape)} that is not "
        "one of the model's received a gradient in mode='clip' (one used in the loss, such "
        "as a learnable temperature or class bias, or a second model's output added to it; "
        "or one used by a reentrant checkpoint's segment without being registered by the "
        "model): it would be an unclipped gradient outside the per-sample accounting; "
        "freeze it (requires_grad_(False)) or detach what it produces; a trainable layer "
        "(a second model, a head in the loss) must be a torchbp.nn.Linear of the module "
        "given to per_sample_grads; a second model trained by a step of its own, not "
        "private (its own loss and backward): take its step outside the with block"
    )


def refuse_outside_parameter_after_the_context(shape: tuple[int, ...]) -> None:
    """Raise for a backward, after a clip-mode context closed, through a graph that a
    trainable parameter outside the model (of ``shape``) joined inside it (see
    ``OutsideParameterWatch._refuse_backward_after_the_context`` in
    :mod:`torchbp.per_sample.outside_watch`).

    Raises:
        RuntimeError: always, naming its shape and the way out.
    """
    raise RuntimeError(
        f"per_sample_grads: a backward after the with block of a mode='clip' context "
        f"reached a graph that a trainable nn.Parameter of shape {shape}, not one of the "
        "model's, joined inside it: it would get an unclipped gradient outside the "
        "per-sample accounting; call loss.backward() inside the with block (where such a "
        "parameter is refused too: freeze it or detach what it produces)"
    )


def refuse_unseen_checkpoint() -> None:
    """Raise for a reentrant checkpoint in the graph of a clip-mode backward whose segment
    the context never saw run (run before the context was entered, or on another thread;
    see ``OutsideParameterWatch._refuse_unseen_checkpoints`` in
    :mod:`torchbp.per_sample.outside_watch`), as the backward starts, before any gradient
    is written.

    Raises:
        RuntimeError: always, naming the ways out.
    """
    raise RuntimeError(
        "per_sample_grads: the backward runs through a reentrant activation checkpoint "
        "(torch.utils.checkpoint with use_reentrant=True) not seen run inside the context "
        "(run before it was entered, or on another thread), whose forward keeps no graph: "
        "the trainable parameters its segment uses cannot be seen, and its backward would "
        "give them an unclipped gradient outside the per-sample accounting in mode='clip': "
        "run it inside the with block, on its thread, use use_reentrant=False (its graph is then "
        "checked), or detach its output"
    )


def refuse_checkpointed_outside_parameter(p: nn.Parameter) -> None:
    """Raise for a trainable parameter outside the model used inside a reentrant
    checkpoint's segment (see ``OutsideParameterWatch.checkpointed_parameter`` in
    :mod:`torchbp.per_sample.outside_watch`), at the first parameter the backward
    reaches, before any gradient is written.

    Raises:
        RuntimeError: always, naming its shape and the ways out.
    """
    raise RuntimeError(
        f"per_sample_grads: a trainable nn.Parameter of shape {tuple(p.shape)} that is not "
        "one of the model's is used inside a reentrant activation checkpoint "
        "(torch.utils.checkpoint with use_reentrant=True: one in front of the model whose "
        "output reaches it other than as an argument, or one of the model's that uses a "
        "parameter the model does not register), whose backward would give it an "
        "unclipped gradient outside the per-sample accounting in mode='clip': register it "
        "in a torchbp.nn.Linear of the model, freeze it (requires_grad_(False)), use "
        "use_reentrant=False (its graph is then checked), or detach the checkpoint's output"
    )
