"""The uses of autograd an open ``per_sample_grads`` context refuses from its hooks, and
their messages: a second backward, ``torch.autograd.grad`` with respect to a trainable
parameter, a gradient reaching a parameter through an op other than its Linear, a
backward after one cut short by an error, and (clip mode) a trainable parameter outside
the model feeding its output, used after it (in the loss), used by a reentrant
checkpoint's segment, or reached by a backward after the context (:class:`OutsideParameterWatch`).

Each message starts with ``per_sample_grads:`` and says what to do instead.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.checkpoint import CheckpointFunction

from torchbp.per_sample.recorder import running_checkpoint_segments, running_on_this_thread

__all__ = [
    "OutsideParameterWatch",
    "autograd_grad_refusal",
    "inside_autograd_grad",
    "outside_parameters_guard",
    "passed_through_autograd_grad",
    "refuse_backward_after_one_cut_short",
    "refuse_second_backward",
    "refuse_stray_gradient",
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
            "weight_decay instead), or does the model run under torch.compile, which "
            "is not supported?"
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


def outside_parameters_guard(model: nn.Module) -> Callable:
    """A forward hook for ``model`` (clip mode) that refuses an output whose autograd graph
    reaches a trainable :class:`~torch.nn.Parameter` that is not one of the model's (a
    second model before it, or a parameter its forward uses without registering it): the
    backward would give that parameter an unclipped gradient, with no per-sample
    accounting, into its ``p.grad``, where an optimizer stepping it would leak what
    DP-SGD protects; and an input made by a reentrant activation checkpoint, whose
    parameters no graph shows. A copy of the model (``copy.deepcopy`` copies the hook) is
    let be, and so is a forward traced by ``torch.compile``, refused at the backward.
    Register it with ``with_kwargs=True``: it reads the inputs, by position or keyword.
    """
    guarded = weakref.ref(model)
    # the model's parameters now, when the context is created: a forward whose leaves are
    # all among them is let be without listing the model's parameters again
    at_creation = {id(p): p for p in model.parameters()}
    # the nodes of the reentrant checkpoints that the model's own forwards ran (in an
    # output's graph, not in that call's inputs'): in a later call's input (the model
    # applied to its own output) they are not checkpoints in front of it
    own_checkpoints: weakref.WeakSet = weakref.WeakSet()

    def refuse_parameters_outside(
        module: nn.Module, args: tuple, kwargs: dict, output: object
    ) -> None:
        if module is not guarded():
            return
        if torch.compiler.is_compiling():
            # Dynamo cannot trace grad_fn (with fullgraph=True its error would replace
            # the context's own refusal of torch.compile, at the backward)
            return
        leaves, checkpoints = _walk_graph(_tensors(output))
        if checkpoints:
            _, before = _walk_graph(_tensors((args, kwargs)))
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


def _walk_graph(tensors: Iterable[torch.Tensor]) -> tuple[list[nn.Parameter], set]:
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


def _tensors(output: object) -> Iterator[torch.Tensor]:
    """The tensors of ``output``: itself, or those in its tuples, lists, mapping values and
    dataclass fields (a model output class such as Hugging Face's ``ModelOutput``)."""
    if isinstance(output, torch.Tensor):
        yield output
    elif isinstance(output, (tuple, list)):
        for item in output:
            yield from _tensors(item)
    elif isinstance(output, Mapping):
        for item in output.values():
            yield from _tensors(item)
    elif dataclasses.is_dataclass(output) and not isinstance(output, type):
        for item in dataclasses.fields(output):
            yield from _tensors(getattr(output, item.name, None))


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
    ``loss.backward()`` (or ``torch.autograd.backward``) runs (:meth:`_before_a_backward`).

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
    """

    def __init__(
        self,
        model: nn.Module,
        refuse: Callable[[nn.Parameter], None],
        hold_results: Callable[[list[nn.Parameter]], None],
    ) -> None:
        super().__init__()
        self._model = model
        self._refuse = refuse
        self._hold_results = hold_results
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

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if self._closed:
            # left on this thread's mode stack after the context closed: torch pops the
            # top mode at each exit, so a user's mode entered inside the context and
            # still active at its exit is popped in its place (this one goes at the
            # user's mode's exit); until then it must hook and refuse nothing
            return func(*args, **kwargs) if kwargs else func(*args)
        joined = self._scan(args)
        if kwargs:
            in_keywords = self._scan(kwargs.values())  # torch.cat(tensors=(x, prompt))
            joined = joined if in_keywords is None else in_keywords
        if func in _BACKWARDS:
            self._before_a_backward(func, args, kwargs or {})
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
        leaves, _ = _walk_graph(_tensors(roots))
        if inputs is not None:
            wanted = {id(t) for t in _tensors(inputs)}
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
        nodes = {id(t.grad_fn): t.grad_fn for t in _tensors(result) if t.grad_fn is not None}
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
            refuse_outside_parameter_after_the_context(shape)

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


def refuse_outside_parameter_gradient(p: nn.Parameter) -> None:
    """Raise for a trainable parameter outside the model that a clip-mode backward reached
    (see :class:`OutsideParameterWatch`), before its unclipped gradient is written.

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
    :meth:`OutsideParameterWatch._refuse_backward_after_the_context`).

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


def refuse_checkpointed_outside_parameter(p: nn.Parameter) -> None:
    """Raise for a trainable parameter outside the model used inside a reentrant
    checkpoint's segment (see :meth:`OutsideParameterWatch.checkpointed_parameter`), at
    the first parameter the backward reaches, before any gradient is written.

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
