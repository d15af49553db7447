"""What the Linear Function tells an open ``per_sample_grads`` context, call by call.

:class:`torchbp.autograd.LinearFunction` looks up the thread's active :class:`Recorder`
(or, on another thread, as a reentrant checkpoint's recomputation is, the one recording
its weight) in ``setup_context`` and, if there is one, asks it for a :class:`Use` of that
call; in backward it hands the Use its saved input ``x`` and its output gradient ``g``.
The Use files them, shaped ``(B, T, features)``, on its layer's ``traces`` and tells the
backward to skip ``dW`` and ``db``; nothing else happens during the backward. A call with
trainable parameters the context cannot record gets a :class:`Stray`, which refuses it at
its backward.
"""

from __future__ import annotations

import inspect
import math
import threading
import weakref
from collections.abc import Callable, MutableMapping
from typing import Any

import torch
from torch.utils.checkpoint import CheckpointFunction

from torchbp._execution import has_storage
from torchbp.per_sample.model_check import Layer


class Recorder:
    """Routes each Linear call to its layer, by the identity of its weight and bias
    Parameters (Linears may share a frozen weight, each training its own bias).

    ``check_parameters`` raises, naming it, if a parameter of the model was replaced,
    frozen or unfrozen since the layers were picked: called before refusing a call that
    such a change explains (a stray trainable Linear, a tracked weight without its input).
    """

    def __init__(self, layers: list[Layer], check_parameters: Callable[[], None]) -> None:
        stable = [layer for layer in layers if not layer.weight_formed_per_call]
        self._by_parameters = {_parameter_ids(layer.module): layer for layer in stable}
        self._by_weight = {id(layer.module.weight): layer for layer in stable}
        # a layer whose frozen weight is formed anew at every forward (parametrized) is
        # matched by its trainable bias: db_i = Σ_t g_it, whatever the weight
        self._by_bias = {id(layer.bias): layer for layer in layers if layer.weight_formed_per_call}
        self.check_parameters = check_parameters
        self.finalised = False
        self.closed = False  # the context has exited
        # backward calls filed so far, and the names of the layers they passed: a call
        # made after a filing belongs to a later backward than that filing's (one that
        # reached no trainable parameter, so nothing marked its end)
        self.recordings = 0
        self.filed_layer_names: dict[str, None] = {}
        # a backward was refused before the results were formed: they never will be
        self.failed = False
        # a backward reached the trainable parameters (set by the open context): unless
        # its results were formed, it was cut short by an error
        self.parameters_reached = False
        # (name, module, whether autocast is on for its device) for each tracked Linear
        # module whose forward is running, innermost last (see track_calls)
        self.calling: list[tuple[str, torch.nn.Module, bool]] = []
        self.segments = SegmentMap()
        # called with the trainable tensors of each call that gets a Stray (set by the
        # open context: its results wait for that call's backward, which refuses it)
        self.watch_stray: Callable[[list[torch.Tensor]], None] | None = None
        # (clip mode, set by the open context) the thread that entered it, whose torch
        # function mode alone watches for parameters outside the model, and whether that
        # mode saw a backward start that is still running (see Use.on_backward)
        self.step_thread: int | None = None
        self.backward_seen: Callable[[], bool] = no_backward_seen

    def track_calls(self, layer: Layer) -> list:
        """Hooks on each module of ``layer`` (its Linear and those tied to it) that keep
        :attr:`calling` while its forward runs, so that a linear call inside it that cannot
        be recorded (a weight cast by autocast) is refused naming the module. Returns
        their handles."""
        return [hook for name, module in layer.modules() for hook in self._track(name, module)]

    def _track(self, name: str, linear: torch.nn.Module) -> list:
        def enter(module, args) -> None:
            if module is not linear:
                return  # a copy of the module (copy.deepcopy copies its hooks)
            if torch.compiler.is_compiling():
                # (Dynamo on some torch versions cannot trace the autocast query; a
                # compiled model is refused at the backward)
                return
            # read here: the linear wrapper applies autocast itself and calls the Function
            # with it off
            autocast = _autocast_enabled(module.weight.device.type)
            self.calling.append((name, linear, autocast))

        def leave(module, args, output) -> None:
            # also after an error in the forward (always_call); only what enter pushed
            if module is linear and self.calling and self.calling[-1][1] is linear:
                self.calling.pop()

        return [
            linear.register_forward_pre_hook(enter, prepend=True),
            linear.register_forward_hook(leave, always_call=True),
        ]

    def on_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
        """A :class:`Use` for this call of a tracked layer, a :class:`Stray` for a call
        with trainable parameters that cannot be recorded, or ``None`` for one that needs
        no recording.

        ``setup_context`` runs with grad mode off whether or not a graph is being built,
        so every call of a tracked layer gets a Use; one whose backward never runs (an
        evaluation forward under ``torch.no_grad()``) records nothing. Errors wait for
        the backward for the same reason.
        """
        layer = self._by_parameters.get((id(weight), _id_or_none(bias)))
        if layer is None and bias is not None and not weight.requires_grad:
            layer = self._by_bias.get(id(bias))
        trainable = weight.requires_grad or (bias is not None and bias.requires_grad)
        if (layer is not None or trainable) and _inside_torch_func(x, weight, bias):
            return self._stray(self._transform_reason(layer), weight, bias)
        if layer is None:
            if trainable:
                reason = self._stray_reason(self._by_weight.get(id(weight)), weight)
                return self._stray(reason, weight, bias)
            return None
        use = Use(self, layer, x.shape)
        if self.recordings == 0 and not self.segments.checked:
            self.segments.note(use, self._caller_name(layer))
        return use

    def _stray(self, reason: str, weight: torch.Tensor, bias: torch.Tensor | None) -> Stray:
        """A :class:`Stray` refusing a call for ``reason`` at its backward; the open
        context's results wait for that backward (:attr:`watch_stray`), which may run
        after the backward has passed every parameter of the model (a call made before
        the model's), so that no ``p.grad`` is written before the refusal."""
        if self.watch_stray is not None:
            self.watch_stray([t for t in (weight, bias) if t is not None])
        return Stray(self, reason)

    def _caller_name(self, layer: Layer) -> str:
        """The name of the module of ``layer`` (its Linear, or one tied to it) whose forward
        makes the call being recorded: the innermost tracked module running, if it is one
        of the layer's; else (a functional call with the layer's parameters) the layer's."""
        if self.calling:
            name, module, _ = self.calling[-1]
            if any(module is tied for _, tied in layer.modules()):
                return name
        return layer.name

    def _transform_reason(self, layer: Layer | None) -> str:
        """Why a linear call made inside a ``torch.func`` transform cannot be recorded."""
        if self.calling:
            what = f"Linear {self.calling[-1][0]!r}"
        else:
            what = "a torchbp linear call" if layer is None else f"Linear {layer.name!r}"
        return (
            f"{what} ran inside a torch.func transform (vmap, grad, jacrev, ...), whose "
            "tensors stand for others (a batch of them, or a copy tracked by the "
            "transform); the context records calls on the model's own tensors: call the "
            "model on the whole batch without vmap (the context gives per-sample results "
            "from the one backward), or run the transform outside the context"
        )

    def _stray_reason(self, layer: Layer | None, weight: torch.Tensor) -> str:
        """What makes a linear call with trainable parameters unrecordable, naming the
        model's Linear involved where there is one."""
        if layer is not None:
            return (
                f"the weight of Linear {layer.name!r} was passed to a linear call with a "
                "bias other than its own (a functional call, or a Linear outside the model "
                "that shares only the weight: a call is recorded for the layer only with "
                "its weight and its bias, so share the bias too, or use none in either, or "
                "give the other call its own weight)"
            )
        caller, module, autocast = self.calling[-1] if self.calling else (None, None, False)
        if autocast:
            return (
                f"Linear {caller!r} ran under autocast, which hands it a weight cast by "
                f"autocast to {weight.dtype}, a copy of its parameter (autocast is not "
                "supported: run the model without it)"
            )
        if caller is not None and module.weight is weight:
            return (
                f"Linear {caller!r} ran with its weight swapped for another tensor of "
                f"shape {tuple(weight.shape)} (as torch.func.functional_call does, or a "
                "forward pre-hook that sets a new weight at every forward, such as the "
                "deprecated torch.nn.utils.weight_norm's or spectral_norm's, frozen or not); "
                "the context records the model's own parameters: call the model itself, "
                "without such hooks"
            )
        if caller is not None:
            return (
                f"Linear {caller!r} passed a weight of shape {tuple(weight.shape)} other "
                "than its own parameter to linear (does its forward transform it?)"
            )
        return (
            f"a torchbp linear with a trainable weight of shape {tuple(weight.shape)} is not "
            "a torchbp.nn.Linear of the model given to per_sample_grads (a Linear outside "
            "that model, such as a second model's, a functional linear call, or a weight "
            "cast by autocast, which is not supported): give per_sample_grads one module "
            "holding every trainable Linear of the step (e.g. nn.Sequential or a "
            "ModuleDict), or freeze that one (requires_grad_(False))"
        )


def no_backward_seen() -> bool:
    """:attr:`Recorder.backward_seen` without a clip-mode context open."""
    return False


def _autocast_enabled(device_type: str) -> bool:
    """Whether autocast is on for ``device_type``: never for one that has no autocast
    (``meta``), for which torch's query raises."""
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


def _inside_torch_func(*tensors: torch.Tensor | None) -> bool:
    """Whether a dense one of ``tensors`` is one that a ``torch.func`` transform wraps or
    batches (it has no storage of its own; a sparse tensor has none either). A plain loop,
    the layout read only without storage: it runs at every recorded Linear call."""
    for t in tensors:
        if t is not None and not has_storage(t) and t.layout == torch.strided:
            return True
    return False


def _id_or_none(t: torch.Tensor | None) -> int | None:
    return None if t is None else id(t)


def _parameter_ids(module: torch.nn.Module) -> tuple[int, int | None]:
    """The ids of a Linear module's weight and bias (``None`` without one): the key of its
    calls, ``linear(x, weight, bias)``."""
    return id(module.weight), _id_or_none(module.bias)


class Use:
    """One forward call of one Linear layer; receives that call's backward."""

    __slots__ = (
        "recorder",
        "layer",
        "x_shape",
        "recorded",
        "born",
        "__weakref__",  # SegmentMap holds its Uses weakly: a Use lives as long as its node
    )

    def __init__(self, recorder: Recorder, layer: Layer, x_shape: torch.Size) -> None:
        self.recorder = recorder
        self.layer = layer
        self.x_shape = x_shape
        self.recorded = False
        self.born = recorder.recordings  # backward calls filed before this forward call

    def on_backward(self, x: torch.Tensor | None, g: torch.Tensor) -> bool:
        """File ``(a, g)`` as ``(B, T, features)``; return False: the Linear backward skips
        dW and db, which the context forms afterwards (one matmul each, as the backward
        would), so that autograd never holds or accumulates them."""
        if self.recorder.closed:
            raise RuntimeError(
                f"per_sample_grads: the backward through Linear {self.layer.name!r} ran after "
                "its per_sample_grads context had closed; call loss.backward() inside the "
                "with block"
            )
        if self.recorder.failed:
            raise RuntimeError(
                f"per_sample_grads: a backward through Linear {self.layer.name!r}, but this "
                "context refused an earlier backward, or one was cut short by an error (which "
                "was caught), so it forms nothing: open a new context for the step"
            )
        if torch.is_grad_enabled():
            # autograd runs a backward's nodes in grad mode exactly when create_graph=True
            self._refuse_create_graph()
        if self._on_another_threads_cpu_backward(g):
            self._refuse_backward_on_another_thread()
        if not self.recorder.segments.checked:
            self._refuse_split_segments()
        # every call of one forward is made before its backward files anything; so is
        # a reentrant checkpoint's recomputation of a segment holding every trainable
        # call (a trainable call filed before the segment is a split, refused above)
        if self.born:
            self._refuse_call_made_after_a_backward()
        if self.recorded or self.recorder.finalised:
            raise RuntimeError(
                f"per_sample_grads: a second backward through Linear {self.layer.name!r} "
                "inside one context; a context records one forward and backward: open a "
                "new one per step"
            )
        if self.layer.weight is not None and x is None:
            # the weight did not require grad at the forward, so x was not saved
            self.recorder.failed = True
            self.recorder.check_parameters()
            raise RuntimeError(
                f"per_sample_grads: the weight of Linear {self.layer.name!r} did not require "
                "grad at its forward, but was trainable when the context was created"
            )
        if len(self.x_shape) < 2:
            self.recorder.failed = True
            raise ValueError(
                f"per_sample_grads: Linear {self.layer.name!r} got an input of shape "
                f"{tuple(self.x_shape)}; it needs a leading sample dim: (B, ..., in_features)"
            )
        if x is not None and x.layout != torch.strided:
            self.recorder.failed = True
            raise ValueError(
                f"per_sample_grads: Linear {self.layer.name!r} got a {x.layout} input; "
                "per-sample gradients need a dense one (pass x.to_dense())"
            )
        self.recorded = True
        batch = self.x_shape[0]
        # T: the product of the dims between the sample dim and the features
        positions = math.prod(self.x_shape[1:-1])
        a = None
        if self.layer.weight is not None:
            a = x.reshape(batch, positions, x.shape[-1])
        g = g.reshape(batch, positions, g.shape[-1])
        self.layer.traces.append((a, g))
        self.recorder.recordings += 1
        self.recorder.filed_layer_names[self.layer.name] = None
        return False

    def on_backward_error(self) -> None:
        """This call's backward raised (forming ``dx``): the backward was cut short, maybe
        after other calls filed, before any parameter was reached; the recorder fails, so
        that a later backward is refused before it files anything."""
        self.recorder.failed = True

    def _refuse_create_graph(self) -> None:
        """Refuse a backward with ``create_graph=True`` (a gradient penalty, a
        Hessian-vector product) before anything of it is filed: the context forms
        ``p.grad`` after the backward, with no graph, so a term built from it would
        silently contribute no gradient. A gradient penalty's own parameter gradient
        runs through the graph of the Linear backward (``dx = g W``), not through the
        recorded ``(a, g)`` of each call, so the per-sample norms would leave it out:
        such a loss is not served, and the refusal names torch.func, which is."""
        self.recorder.failed = True
        raise RuntimeError(
            f"per_sample_grads: a backward with create_graph=True through Linear "
            f"{self.layer.name!r}; the context forms p.grad after the backward, without a "
            "graph, so the gradients cannot be differentiated, and the per-sample norms "
            "are of first-order gradients only: a loss holding a gradient penalty "
            "(torch.autograd.grad(loss, x, create_graph=True) in the loss) cannot be "
            "clipped per sample here; for it, form the per-sample gradients with "
            "torch.func (vmap(grad(loss_of_one_sample)) over the parameters, each "
            "sample's loss holding its own penalty), clip and sum them yourself; an input "
            "gradient without a graph (an adversarial example) is served: take it before "
            "entering the context; else call backward() without create_graph"
        )

    def _on_another_threads_cpu_backward(self, g: torch.Tensor) -> bool:
        """(clip mode) Whether this backward runs on a thread other than the one that
        entered the context and was not seen starting there, known on CPU only, where a
        backward runs on the thread that calls it (on other devices it runs on the
        device's autograd thread, whichever thread called it)."""
        recorder = self.recorder
        return (
            recorder.step_thread is not None
            and threading.get_ident() != recorder.step_thread
            and g.device.type == "cpu"  # (read last: a torch function mode sees it)
            and not recorder.backward_seen()
        )

    def _refuse_backward_on_another_thread(self) -> None:
        """Refuse a clip-mode backward called on a thread other than the one that entered
        the context, before anything of it is filed: the torch function mode watching for
        trainable parameters outside the model, active on the entering thread only, saw
        neither the loss built there nor the graph this backward runs."""
        self.recorder.failed = True
        raise RuntimeError(
            f"per_sample_grads: in mode='clip' a backward through Linear "
            f"{self.layer.name!r} ran on a thread other than the one that entered the "
            "context, whose watch for trainable parameters outside the model (which would "
            "get an unclipped gradient) is active on its own thread only; nothing is "
            "formed, but a parameter outside the model that this backward reached before "
            "the model may hold its gradient: zero the gradients, and run the step's "
            "forward, loss and backward on the thread of the with block"
        )

    def _refuse_call_made_after_a_backward(self) -> None:
        """Refuse this call, made (or recomputed by a reentrant checkpoint) after an
        earlier backward filed its calls: a second backward, whichever layers the two
        pass. Raised at its first Linear, before anything of it is filed or formed (a
        reentrant checkpoint's inner backward would otherwise form, and write p.grad,
        before the outer one reaches the rest). After the context's recorded backward,
        whose results stay, it is that backward's second; after one that reached the
        parameters and was never formed, it follows one cut short by an error."""
        if self.recorder.finalised:
            raise RuntimeError(
                f"per_sample_grads: a second backward through Linear {self.layer.name!r} "
                "inside one context (it was called after the context's backward was "
                "recorded); a context records one forward and backward: open a new one per "
                "step"
            )
        self.recorder.failed = True
        if self.recorder.parameters_reached:
            raise RuntimeError(
                f"per_sample_grads: a backward through Linear {self.layer.name!r} after an "
                "earlier backward in this context reached the parameters and was cut short "
                "by an error (which was caught), so it forms nothing: open a new context for "
                "the step"
            )
        earlier = ", ".join(map(repr, self.recorder.filed_layer_names))
        recomputed = ""
        if inside_reentrant_checkpoint():
            recomputed = (
                f" (Linear {self.layer.name!r} was recomputed by a reentrant activation "
                "checkpoint (use_reentrant=True): with one, only a segment holding every "
                "trainable Linear call works; else use use_reentrant=False)"
            )
        raise RuntimeError(
            f"per_sample_grads: a second backward inside one context: Linear "
            f"{self.layer.name!r} was called after an earlier backward (e.g. "
            f"torch.autograd.grad w.r.t. the input) had passed Linear {earlier}; a context "
            "records one forward and backward: open it after such a backward, or a new one "
            f"per step{recomputed}"
        )

    def _refuse_split_segments(self) -> None:
        """At the first Linear backward, before any gradient is formed: refuse a forward
        whose trainable Linear calls still in the graph are split across reentrant
        checkpoint segments, or between one and the rest of the model."""
        groups = self.recorder.segments.take_groups()
        if len(groups) < 2:
            return
        self.recorder.failed = True
        segments = iter(range(1, len(groups) + 1))
        where = "; ".join(
            f"{'outside any segment' if not path else f'in segment {next(segments)}'}: Linear "
            + ", ".join(map(repr, names))
            for path, names in groups.items()
        )
        raise RuntimeError(
            "per_sample_grads: the trainable Linear layers of this forward are split across "
            f"reentrant activation checkpoint segments (use_reentrant=True): {where}; each "
            "segment runs a backward of its own, and the first of them to end would end the "
            "recording, so nothing is formed (p.grad is left as it was); with "
            "use_reentrant=True only one segment holding every trainable Linear call works: "
            "use use_reentrant=False"
        )


def inside_reentrant_checkpoint() -> bool:
    """Whether a reentrant checkpoint's backward (which recomputes its segment and runs
    an inner backward through it) is on this thread's Python stack."""
    return running_on_this_thread(_CHECKPOINT_BACKWARD_CODE)


def running_on_this_thread(code) -> bool:
    """Whether a call of the function whose code object is ``code`` is on this thread's
    Python stack."""
    frame = inspect.currentframe()
    while frame is not None:
        if frame.f_code is code:
            return True
        frame = frame.f_back
    return False


_CHECKPOINT_BACKWARD_CODE = CheckpointFunction.backward.__code__
_CHECKPOINT_FORWARD_CODE = CheckpointFunction.forward.__code__


class SegmentMap:
    """Which reentrant checkpoint segment each trainable Linear call of the forward ran in.

    A reentrant checkpoint runs its segment's forward without a graph and, in the backward,
    recomputes it and runs a backward of its own through it: the Linear calls of the
    segment and those outside it (or in another segment) are passed by different
    backwards, each of which ends the recording when it has passed its layers. Noted at the
    forward, checked at the first Linear backward (:meth:`take_groups`), before any
    gradient is written. Only calls still in a graph count: a call outside any segment
    while its node lives (not one made under ``torch.no_grad()``), one inside while the
    outermost checkpoint around it lives (not one made for an evaluation).
    """

    def __init__(self) -> None:
        self.checked = False
        # (Use, name of the module that made it, thread) for the calls made outside any segment
        self._outside: list[tuple[weakref.ref, str, int]] = []
        # per outermost segment (its checkpoint's node): {path of segment serials: names}
        self._inside: MutableMapping[Any, dict[tuple, list[str]]] = weakref.WeakKeyDictionary()
        # per outermost segment: the thread its forward ran on
        self._threads: MutableMapping[Any, int] = weakref.WeakKeyDictionary()
        self._serials: MutableMapping[Any, int] = weakref.WeakKeyDictionary()

    def note(self, use: Use, caller: str) -> None:
        """File a Use made at the forward by the module named ``caller`` (a Linear tied to
        another is named as itself, not as the layer that records it); one made while a
        reentrant checkpoint recomputes its segment, in the backward, is not noted."""
        nodes = running_checkpoint_segments()
        if nodes is None:
            return
        thread = threading.get_ident()
        if not nodes:
            self._outside.append((weakref.ref(use), caller, thread))
            return
        self._threads.setdefault(nodes[0], thread)
        path = tuple(self._serials.setdefault(node, len(self._serials)) for node in nodes)
        names = self._inside.setdefault(nodes[0], {}).setdefault(path, [])
        if caller not in names:
            names.append(caller)

    def forget_this_thread(self) -> None:
        """Drop what was noted on this thread: the calls of a forward refused as it ends
        (clip mode's model forward on another thread), which would otherwise stay while
        its error lives (a ``concurrent.futures.Future`` keeps it, the forward's graph or
        its checkpoint's node in the traceback) and split the next step's calls into
        segments, refusing that correct step."""
        thread = threading.get_ident()
        self._outside = [note for note in self._outside if note[2] != thread]
        for node in [node for node, ran_on in self._threads.items() if ran_on == thread]:
            self._inside.pop(node, None)
            del self._threads[node]

    def ran_model_calls(self, node) -> bool:
        """Whether the reentrant checkpoint of ``node`` is the outermost segment of a noted
        call (the model run inside it: ``checkpoint(model, x)``), until the check."""
        return node in self._inside

    def take_groups(self) -> dict[tuple, list[str]]:
        """The names of the modules that made the calls still in a graph, by segment path
        (``()``: outside any segment); marks the check done and drops what was noted."""
        groups: dict[tuple, list[str]] = {}
        outside = list(dict.fromkeys(name for use, name, _ in self._outside if use() is not None))
        if outside:
            groups[()] = outside
        for paths in list(self._inside.values()):
            groups.update(paths)
        self.checked = True
        self._outside, self._inside, self._threads, self._serials = [], {}, {}, {}
        return groups


def running_checkpoint_segments() -> tuple | None:
    """The nodes of the reentrant checkpoints whose segment forward is running on this
    thread, outermost first; ``None`` while a reentrant checkpoint's backward runs (it
    recomputes its segment)."""
    nodes = []
    frame = inspect.currentframe()
    while frame is not None:
        code = frame.f_code
        if code is _CHECKPOINT_BACKWARD_CODE:
            return None
        if code is _CHECKPOINT_FORWARD_CODE:
            # Function.forward's first argument is its ctx, the node of the checkpoint
            nodes.append(frame.f_locals[code.co_varnames[0]])
        frame = frame.f_back
    return tuple(reversed(nodes))


class Stray:
    """A torchbp linear call with trainable parameters the context does not account for;
    refused at its backward (an evaluation forward never has one)."""

    __slots__ = ("recorder", "reason")

    def __init__(self, recorder: Recorder, reason: str) -> None:
        self.recorder = recorder
        self.reason = reason

    def on_backward_error(self) -> None:
        self.recorder.failed = True

    def on_backward(self, x: torch.Tensor | None, g: torch.Tensor) -> bool:
        self.recorder.failed = True
        self.recorder.check_parameters()  # a model Linear frozen, or replaced, since?
        raise RuntimeError(
            f"per_sample_grads: {self.reason}; its per-sample contribution cannot be recorded"
        )
