"""Clip mode's watch, while a ``per_sample_grads`` context is open, for the trainable
parameters (:class:`~torch.nn.Parameter`) outside the model that the model's output
graph, walked at its forward, cannot show: used after the model (in the loss), inside a
reentrant checkpoint's segment, or reached by a backward after the context. The
refusals it raises are in :mod:`torchbp.per_sample.refusals`.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from torchbp.per_sample import refusals
from torchbp.per_sample.recorder import running_checkpoint_segments
from torchbp.per_sample.refusals import tensors_in, walk_graph

__all__ = ["OutsideParameterWatch"]


class OutsideParameterWatch(TorchFunctionMode):
    """(clip mode, while the context is open) Watches every torch function call for a
    trainable :class:`~torch.nn.Parameter` that is not the model's (a learnable
    temperature or class bias applied to the model's output in the loss, a second model
    whose output joins it): each gets a gradient hook that calls ``refuse(p)`` when a
    backward computes its gradient, before autograd adds it to ``p.grad``, unclipped.
    The model's output graph, walked at its forward, cannot show a parameter used after
    the model; this sees it where it is used. The graph nodes fed by such a use also get a
    pre-hook refusing a backward through them after the context (``loss.backward()``
    after the ``with`` block; after a done step, only through the model's output).

    A reentrant checkpoint's forward runs its segment without grad, and its backward
    recomputes it and gives the parameters used there their gradient (one in front of the
    model, reaching it through an attribute; one the model's own checkpoint uses without
    registering it), after the context has formed the model's: such a use, with grad mode
    off inside a checkpoint's forward, is noted with the checkpoint's node
    (:meth:`checkpointed_parameter`), for the context to refuse at the first parameter the
    backward reaches. Not seen used: a parameter given to a custom ``autograd.Function``
    whose ``forward`` passes it to no torch function (``apply`` is not one), one used on
    another thread (a mode is active on the thread that entered it only), or only before
    the context was entered; each is refused from the graph of the backward the context's
    ``loss.backward()`` (or ``torch.autograd.backward``) runs (:meth:`_before_a_backward`),
    and so is a backward through a reentrant checkpoint it never saw run (run before the
    context was entered, or on another thread), whose parameters no graph shows; one run
    while it is active is seen by its torch calls made with grad mode off.

    Args:
        model: the model given to ``per_sample_grads``; its parameters at creation are
            its own (one replaced, unfrozen or added since is refused by name elsewhere).
        refuse: called with the parameter from its gradient hook; raises.
        hold_results: called, as a backward starts (``Tensor.backward``, and
            ``torch.autograd.backward`` where torch makes it a torch function, as 2.13
            does), with the parameters hooked since the last call that were used with
            grad enabled, so that the context's results wait for their gradients (which
            ``refuse`` refuses first): one whose gradient comes after the model's (a
            parameter used before the model's forward, in a term of the loss that does
            not pass through the model) would otherwise be refused after the clipped
            ``p.grad`` were written. Once per backward, not per parameter: each call
            registers the results' hook anew, on every parameter held so far.
        ran_the_model: whether a reentrant checkpoint's node is one the model's forward
            ran (:func:`~torchbp.per_sample.refusals.outside_parameters_guard`), or one
            whose segment ran the model (``checkpoint(model, x)``).
        fail: called before a refusal raised as a backward starts (the context then
            forms nothing, even if the caller catches it).
    """

    def __init__(
        self,
        model: nn.Module,
        refuse: Callable[[nn.Parameter], None],
        hold_results: Callable[[list[nn.Parameter]], None],
        ran_the_model: Callable[[object], bool],
        fail: Callable[[], None],
    ) -> None:
        super().__init__()
        self._model = model
        self._refuse = refuse
        self._hold_results = hold_results
        self._ran_the_model = ran_the_model
        self._fail = fail
        # held, so that no other tensor takes one's id while the context is open
        self._own = list(model.parameters())
        self._own_ids = frozenset(id(p) for p in self._own)
        self._watched: dict[int, weakref.ref] = {}  # id -> weak reference
        self._handles: list = []
        # hooked parameters used with grad enabled, not yet given to hold_results
        self._unheld: list[nn.Parameter] = []
        # what a backward after the context refuses among the graph nodes fed by a
        # watched parameter, set by close(): [_REFUSE_ALL] or [_REFUSE_THROUGH_THE_MODEL]
        # ([None] while open; shared with the nodes' pre-hooks, which hold it, not the watch)
        self._after_close: list[str | None] = [None]
        # (id of the parameter, id of the node) -> their weak references, for each
        # parameter used inside a reentrant checkpoint's forward, with its outermost node
        self._checkpointed: dict[tuple[int, int], tuple[weakref.ref, weakref.ref]] = {}
        # set by close(): a watch left active (see __torch_function__) watches nothing
        self._closed = False
        # the backwards this watch saw start that are still running (on any thread)
        self.backwards_running = 0
        # the nodes of the reentrant checkpoints whose segment ran a torch function while
        # this watch was active (inside the context, on its thread): seen run
        self._seen_checkpoints: weakref.WeakSet = weakref.WeakSet()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if self._closed:
            # left on this thread's mode stack after the context closed: torch pops the
            # top mode at each exit, so a user's mode entered inside the context and
            # still active at its exit is popped in its place (this one goes at the
            # user's mode's exit); until then it must hook and refuse nothing
            return func(*args, **kwargs) if kwargs else func(*args)
        if torch.compiler.is_compiling():
            # nothing to see while Dynamo traces (``_see`` hooks nothing then: the graph
            # walk as a backward starts sees what a compiled region used), and torch
            # 2.11's Dynamo cannot trace the scan: the context's own refusal of a
            # fullgraph compile must come first
            return func(*args, **kwargs) if kwargs else func(*args)
        if not torch.is_grad_enabled():
            # (a reentrant checkpoint's forward runs its segment with grad mode off)
            self._note_running_checkpoints()
        joined = self._scan(args)
        if kwargs:
            in_keywords = self._scan(kwargs.values())  # torch.cat(tensors=(x, prompt))
            joined = joined if in_keywords is None else in_keywords
        if func in _BACKWARDS:
            self._before_a_backward(func, args, kwargs or {})
            return self._run_a_backward(func, args, kwargs or {})
        result = func(*args, **kwargs) if kwargs else func(*args)
        if joined is not None:
            self._refuse_backward_after_the_context(result, joined)
        return result

    def _scan(self, arguments: Iterable) -> nn.Parameter | None:
        """See each parameter among ``arguments``, or among the items of one that is a
        tuple or list (``torch.cat((x, prompt))``); the last one whose gradient the
        call's outputs carry (trainable, with grad enabled), or ``None``."""
        # (written out, not a generator: this runs for every torch function call, a
        # property read included, in the forward, the loss and add_noise)
        own = self._own_ids
        joined = None
        for argument in arguments:
            if type(argument) in _SEQUENCES:
                for item in argument:
                    if id(item) not in own and _is_parameter(item) and self._see(item):
                        joined = item
            elif id(argument) not in own and _is_parameter(argument) and self._see(argument):
                joined = argument
        return joined

    def _before_a_backward(self, func, args: tuple, kwargs: dict) -> None:
        """As ``Tensor.backward`` or ``torch.autograd.backward`` starts: refuse a trainable
        parameter outside the model among the leaves of the graph it runs (those in its
        ``inputs`` if given) that this watch never saw used (used only before the context
        was entered, or on another thread, or given to a custom Function whose
        ``forward`` passes it to no torch function), before any gradient is written (one
        it saw is refused by its hook, after the refusals that name a torchbp Linear
        outside the model); then hold the results for the parameters watched since the
        last backward (see ``hold_results``)."""
        roots, inputs = _roots_and_inputs(func, args, kwargs)
        leaves, checkpoints = walk_graph(tensors_in(roots))
        if checkpoints:
            self._refuse_unseen_checkpoints(checkpoints)
        if inputs is not None:
            wanted = {id(t) for t in tensors_in(inputs)}
            leaves = [p for p in leaves if id(p) in wanted]
        outside = [p for p in leaves if id(p) not in self._own_ids and not _holds(self._watched, p)]
        if outside:
            # one added to the model since its creation is refused by name elsewhere
            current = {id(q) for q in self._model.parameters()}
            for p in outside:
                if id(p) not in current:
                    self._refuse(p)
        if self._unheld:
            unheld, self._unheld = self._unheld, []
            self._hold_results(unheld)

    def _run_a_backward(self, func, args: tuple, kwargs: dict) -> object:
        """Run a backward this watch has seen start, counted in :attr:`backwards_running`
        while it runs (the engine may run it on another thread: a device's)."""
        self.backwards_running += 1
        try:
            return func(*args, **kwargs)
        finally:
            self.backwards_running -= 1

    def _refuse_unseen_checkpoints(self, checkpoints: set) -> None:
        """Refuse a backward through a reentrant checkpoint whose segment the context never
        saw run: not one whose segment ran a torch function under this watch (one using
        a parameter outside the model is refused by name at the first parameter), nor one
        the model's forward ran or whose segment ran the model. Its forward kept no graph,
        so a trainable parameter its segment uses (a head run before the context was
        entered, or on another thread) would get an unclipped gradient from its backward,
        unseen. Where it ran, not what the graph below it reaches, decides: a head's
        checkpoint on the model's output, made on another thread, reaches the model's
        parameters too."""
        for node in checkpoints:
            if node in self._seen_checkpoints or self._ran_the_model(node):
                continue
            self._fail()
            refusals.refuse_unseen_checkpoint()

    def _note_running_checkpoints(self) -> None:
        """Note the reentrant checkpoints whose segment forward runs now, if any, as seen
        run (see :meth:`_refuse_unseen_checkpoints`). A walk up this thread's stack, made
        for torch functions called with grad mode off only."""
        nodes = running_checkpoint_segments()
        if nodes and nodes[-1] not in self._seen_checkpoints:
            self._seen_checkpoints.update(nodes)

    def _see(self, p: nn.Parameter) -> bool:
        """A parameter, not the model's, passed to a torch function: watch it unless it is
        frozen, and note a use inside a reentrant checkpoint's forward; whether the
        call's outputs carry its gradient (trainable, grad enabled)."""
        if not p.requires_grad or torch.compiler.is_compiling():
            return False
        newly_watched = self._watch(p)
        if not torch.is_grad_enabled():
            self._note_checkpoint_use(p)
            return False
        if newly_watched:
            self._unheld.append(p)
        return True

    def _refuse_backward_after_the_context(self, result: object, p: nn.Parameter) -> None:
        """Hook the graph nodes of ``result``, the outputs of a call given ``p``, to refuse
        a backward through them after the context (see :meth:`close`), which would give
        ``p`` an unclipped gradient: after a context in which no backward reached the
        model's parameters (its ``loss.backward()`` after the ``with`` block), any; after
        one in which a backward did, one whose graph below the node reaches the model's
        parameters (a second loss through the model's output). The model's Linears refuse
        such a backward, but a parameter the backward passes first (in the loss, after
        the model) got its gradient before, and one named by ``backward(inputs=...)`` got
        it unrefused. A pre-hook runs before its node computes ``p``'s gradient, and goes
        with the graph."""
        nodes = {id(t.grad_fn): t.grad_fn for t in tensors_in(result) if t.grad_fn is not None}
        for node in nodes.values():
            node.register_prehook(
                _after_the_context_refusal(
                    self._after_close, node.next_functions, self._own_ids, tuple(p.shape)
                )
            )

    def _watch(self, p: nn.Parameter) -> bool:
        """Hook ``p``'s gradient, unless it is hooked already; whether it was not."""
        if _holds(self._watched, p):
            return False
        self._watched[id(p)] = weakref.ref(p)
        model, refuse = self._model, self._refuse

        def refuse_its_gradient(grad: torch.Tensor) -> None:
            # one added to the model since its creation is refused by name elsewhere
            if not any(q is p for q in model.parameters()):
                refuse(p)

        self._handles.append(p.register_hook(refuse_its_gradient))
        return True

    def _note_checkpoint_use(self, p: nn.Parameter) -> None:
        """Note ``p`` with the outermost reentrant checkpoint whose forward runs now, if any."""
        nodes = running_checkpoint_segments()
        if not nodes:
            return
        key = (id(p), id(nodes[0]))
        held = self._checkpointed.get(key)
        if held is None or held[0]() is not p or held[1]() is not nodes[0]:
            self._checkpointed[key] = (weakref.ref(p), weakref.ref(nodes[0]))

    def checkpointed_parameter(self) -> nn.Parameter | None:
        """A noted parameter whose checkpoint's node still lives (its output is in a
        graph, which a backward may run through), or ``None``."""
        for parameter, node in self._checkpointed.values():
            p = parameter()
            if p is not None and p.requires_grad and node() is not None:
                return p
        return None

    def close(self, *, backward_reached_the_model: bool) -> None:
        """Remove every gradient hook it registered and stop watching, as the context
        closes. From now on a backward through the outputs of a call given a watched
        parameter is refused (see :meth:`_refuse_backward_after_the_context`): any,
        unless ``backward_reached_the_model`` (a backward inside the context reached the
        model's parameters: the step is done); after a done step, only one whose graph
        reaches the model's parameters (a second model's backward runs as without the
        context)."""
        self._closed = True
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._after_close[0] = (
            _REFUSE_THROUGH_THE_MODEL if backward_reached_the_model else _REFUSE_ALL
        )


_SEQUENCES = (tuple, list)
# what a backward after a closed context refuses (see OutsideParameterWatch.close)
_REFUSE_ALL = "any backward through a watched parameter's call"
_REFUSE_THROUGH_THE_MODEL = "one whose graph reaches the model's parameters"


def _after_the_context_refusal(
    after_close: list[str | None],
    children: tuple,
    own_ids: frozenset[int],
    shape: tuple[int, ...],
) -> Callable[[tuple], None]:
    """The pre-hook of a graph node fed by a watched parameter of ``shape``, whose
    ``next_functions`` are ``children`` (held by the node itself, not a cycle): refuses a
    backward through it after the context as ``after_close[0]`` says (see
    :meth:`OutsideParameterWatch._refuse_backward_after_the_context`)."""

    def refuse_after_the_context(grad_outputs) -> None:
        refused = after_close[0]
        if refused == _REFUSE_ALL or (
            refused == _REFUSE_THROUGH_THE_MODEL and _reaches_parameters(children, own_ids)
        ):
            refusals.refuse_outside_parameter_after_the_context(shape)

    return refuse_after_the_context


def _reaches_parameters(children: tuple, ids: frozenset[int]) -> bool:
    """Whether the graph below ``children`` (a node's ``next_functions``) accumulates the
    gradient of a parameter whose id is in ``ids``; each node visited once."""
    stack = [child for child, _ in children if child is not None]
    seen = set(stack)
    while stack:
        node = stack.pop()
        grandchildren = node.next_functions
        if not grandchildren:
            if id(getattr(node, "variable", None)) in ids:  # an AccumulateGrad's tensor
                return True
            continue
        for child, _ in grandchildren:
            if child is not None and child not in seen:
                seen.add(child)
                stack.append(child)
    return False


# the torch functions that start a backward (each a torch function, seen by a mode), and
# the position of their ``inputs`` argument
_BACKWARDS = (torch.Tensor.backward, torch.autograd.backward)
_INPUTS_POSITION = {torch.Tensor.backward: 4, torch.autograd.backward: 5}


def _roots_and_inputs(func, args: tuple, kwargs: dict) -> tuple[object, object]:
    """The tensors a call of ``func`` (one of :data:`_BACKWARDS`) runs the backward of,
    and its ``inputs`` (``None`` when not given)."""
    roots = args[0] if args else kwargs.get("tensors")
    position = _INPUTS_POSITION[func]
    inputs = args[position] if len(args) > position else kwargs.get("inputs")
    return roots, inputs


def _is_parameter(argument: object) -> bool:
    """``isinstance(argument, nn.Parameter)``, without its Python-level instance check
    for the common cases: a plain tensor (never a parameter) and a non-tensor."""
    kind = type(argument)
    if kind is nn.Parameter:
        return True
    if kind is torch.Tensor or not issubclass(kind, torch.Tensor):
        return False
    return isinstance(argument, nn.Parameter)  # (a tensor subclass marked as one)


def _holds(tensors: dict[int, weakref.ref], t: torch.Tensor) -> bool:
    """Whether ``tensors`` (id -> weak reference) holds ``t`` itself (not a tensor that
    had its id)."""
    held = tensors.get(id(t))
    return held is not None and held() is t
