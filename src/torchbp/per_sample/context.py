"""``per_sample_grads``: per-sample gradient norms, gradients or clipped gradients from the
one ordinary backward pass."""

from __future__ import annotations

import functools
import threading
import weakref
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import nn
from torch.overrides import handle_torch_function, has_torch_function
from torch.utils.hooks import RemovableHandle

from torchbp.autograd.linear import per_sample_recorders_by_weight, per_sample_recording
from torchbp.per_sample import arguments, refusals
from torchbp.per_sample.arguments import MODES
from torchbp.per_sample.model_check import (
    Layer,
    attributable_layers,
    refuse_changed_parameters,
    sample_dim_guards,
    trainability,
)
from torchbp.per_sample.noise import add_gaussian_noise_
from torchbp.per_sample.outside_watch import OutsideParameterWatch
from torchbp.per_sample.recorder import (
    Recorder,
    inside_reentrant_checkpoint,
    no_backward_seen,
    running_checkpoint_segments,
)
from torchbp.per_sample.results import form_results, gradient_dtype, refuse_unwritable_grad

__all__ = ["MODES", "PerSampleGrads", "per_sample_grads"]


class PerSampleGrads:
    r"""Context manager returned by :func:`per_sample_grads` (see there for the contract).

    Args:
        model: the module whose trainable parameters are accounted for.
        mode: ``"norms"`` | ``"grads"`` | ``"clip"``.
        max_norm: the clipping bound ``C > 0``; required by, and only by, ``"clip"``.
        statistics: also form ``p.sum_grad_squared`` and ``p.grad_variance``.

    Attributes:
        mode: ``"norms"``, ``"grads"`` or ``"clip"``.
        max_norm: the clipping bound ``C`` (clip mode), else ``None``.
        statistics: whether ``p.sum_grad_squared`` and ``p.grad_variance`` are formed.
        parameters: the trainable parameters it accounts for, in module order.

    Shape:
        ``norms``: ``(B,)``; each ``p.grad_sample`` (``"grads"`` mode): ``(B, *p.shape)``.

    Examples::

        >>> import torch, torchbp
        >>> model = torchbp.nn.Linear(3, 2)
        >>> x, y = torch.randn(4, 3), torch.tensor([0, 1, 1, 0])
        >>> with torchbp.per_sample_grads(model, mode="grads") as ps:
        ...     torchbp.nn.CrossEntropyLoss(reduction="sum")(model(x), y).backward()
        >>> ps.batch_size, model.weight.grad_sample.shape, model.bias.grad_sample.shape
        (4, torch.Size([4, 2, 3]), torch.Size([4, 2]))
        >>> torch.allclose(model.weight.grad_sample.sum(0), model.weight.grad)
        True
        >>> per_sample = torch.cat([p.grad_sample.flatten(1) for p in ps.parameters], dim=1)
        >>> torch.allclose(ps.norms, per_sample.norm(dim=1))
        True
    """

    def __init__(
        self,
        model: nn.Module,
        mode: str = "norms",
        max_norm: float | torch.Tensor | None = None,
        *,
        statistics: bool = False,
    ) -> None:
        self.mode = arguments.checked_mode(mode)
        self.max_norm = arguments.checked_max_norm(mode, max_norm)
        self.statistics = arguments.checked_statistics(statistics)
        self._layers: list[Layer] = attributable_layers(model)
        self._sample_dim_guards = sample_dim_guards(model)
        self.parameters: list[nn.Parameter] = [
            p for layer in self._layers for p in layer.parameters()
        ]
        # why there may be none to account for: every one frozen, or none at all
        self._model_has_parameters = any(True for _ in model.parameters())
        # the layers and parameters above are picked by the model's parameters as they are
        # (a function of the model alone, so that the recorder holds no cycle through self)
        self._check_parameters = functools.partial(
            refuse_changed_parameters, model, trainability(model)
        )
        self._recorder = recorder = Recorder(self._layers, self._check_parameters)
        # (clip mode) the nodes of the reentrant checkpoints the model's forwards ran
        own_checkpoints: weakref.WeakSet = weakref.WeakSet()
        # (clip mode) a forward hook on the model, refusing parameters outside it
        self._outside_guard = (
            (model, refusals.outside_parameters_guard(model, own_checkpoints))
            if mode == "clip"
            else None
        )
        # (clip mode) a torch function mode seeing, while the context is open, the
        # trainable parameters outside the model used after it (in the loss) or inside a
        # reentrant checkpoint's segment, which the forward hook's graph walk cannot see
        self._outside_watch = (
            OutsideParameterWatch(
                model,
                self._refuse_outside_parameter,
                self._hold_results_for,
                lambda node: node in own_checkpoints or recorder.segments.ran_model_calls(node),
                self._fail,
            )
            if mode == "clip"
            else None
        )
        self._registered_weights: list[int] = []  # ids in per_sample_recorders_by_weight
        # the same for each weight a parametrization formed inside the context, removed
        # when the weight is freed or the context exits (see _register_formed_weight)
        self._formed_weights: list[weakref.finalize] = []
        self._state = "new"  # -> "open" -> "closed" / "failed"
        # the thread that entered it, whose recording (and, in clip mode, torch function
        # mode stack) it left set; None once it has left them
        self._thread: int | None = None
        self._hooks: list = []
        # the multi-gradient hook that forms the results, on the parameters and on the
        # trainable tensors of every linear call refused at its backward (see _watch_stray)
        self._results_hook: RemovableHandle | None = None
        self._watched: list[torch.Tensor] = []
        # (clip mode) per thread, ``depth``: how many calls of the model are running there
        self._model_calls_running = threading.local()
        # the multi-gradient hook that fires once per backward, at the first parameter it
        # reaches (see _on_a_backward_reaching_parameters)
        self._start_hook: RemovableHandle | None = None
        # ids of the parameters the backward reached (all of them, unless
        # backward(inputs=...) names some): only those get p.grad, as with autograd
        self._reached: set[int] = set()
        self._norms: torch.Tensor | None = None
        self._factors: torch.Tensor | None = None
        self._batch: int | None = None
        self._noised = False  # add_noise has added this step's noise
        self._noise_interrupted = False  # an error while drawing it: some p.grad noised

    # ------------------------------------------------------------------ context protocol
    def __enter__(self) -> PerSampleGrads:
        if self._state != "new":
            raise RuntimeError(
                "per_sample_grads: a context can be entered once; create a new one per step"
            )
        if getattr(per_sample_recording, "recorder", None) is not None:
            raise RuntimeError(
                "per_sample_grads: contexts cannot be nested; another one is open on this thread"
            )
        self._check_parameters()
        # (a weight formed anew at every forward has no identity to be looked up by)
        weights = [
            id(layer.module.weight) for layer in self._layers if not layer.weight_formed_per_call
        ]
        if any(w in per_sample_recorders_by_weight for w in weights):
            raise RuntimeError(
                "per_sample_grads: another context, open on another thread, records this "
                "model's Linear layers"
            )
        try:
            self._register_hooks()
        except BaseException:
            # none left behind: a marker left on a parameter would refuse every later
            # backward outside the context
            self._remove_hooks()
            raise
        per_sample_recording.recorder = self._recorder
        for w in weights:
            per_sample_recorders_by_weight[w] = self._recorder
        self._registered_weights = weights
        if self._outside_watch is not None:
            self._outside_watch.__enter__()
        self._thread = threading.get_ident()
        if self._outside_watch is not None:
            watch = self._outside_watch
            self._recorder.step_thread = self._thread
            self._recorder.backward_seen = lambda: watch.backwards_running > 0
        self._state = "open"
        return self

    def __exit__(self, exc_type, exc, tb) -> Literal[False]:
        if self._thread is not None and self._thread != threading.get_ident():
            refusals.refuse_exit_on_another_thread()
        self._thread = None
        if self._outside_watch is not None and self._state != "new":
            self._outside_watch.close(backward_reached_the_model=bool(self._reached))
            self._outside_watch.__exit__(None, None, None)
            self._outside_watch = None  # (popped once: a second exit pops nothing)
            # (the recorder let go of the watch, which holds this context's methods)
            self._recorder.step_thread = None
            self._recorder.backward_seen = no_backward_seen
        per_sample_recording.recorder = None
        # the ids registered on entering (a weight replaced since has another id)
        for w in self._registered_weights:
            per_sample_recorders_by_weight.pop(w, None)
        self._registered_weights = []
        for unregister in self._formed_weights:
            unregister()  # (a no-op for a weight already freed)
        self._formed_weights = []
        self._recorder.closed = True
        self._remove_hooks()
        if exc_type is not None or self._recorder.failed or self._backward_cut_short():
            self._state = "failed"
        try:
            if self._state == "open" and not self._recorder.finalised and self._has_traces():
                # the backward reached no trainable parameter: like autograd, no p.grad
                self._finalise(forms_param_grads=False)
        finally:
            if self._state == "open":
                self._state = "closed"
            self._release_traces()
        if (
            exc is not None
            and self._backward_cut_short()
            and refusals.passed_through_autograd_grad(tb)
        ):
            # torch's own refusal, from a hook on a device's autograd thread, which the
            # marker cannot see: named here, as it leaves the with block. Only for a call
            # that reached the parameters and never completed: an error from a later
            # torch.autograd.grad (after a finished backward, whose own refusals name
            # themselves) is not about the parameters
            raise RuntimeError(refusals.autograd_grad_refusal("the model's parameters")) from exc
        return False

    def _register_hooks(self) -> None:
        """Register the context's hooks, each handle kept as soon as it exists (so that
        :meth:`_remove_hooks` removes every one registered before an error). With
        inference mode off: under it, torch's multi-gradient hook cannot find a
        parameter's gradient accumulator, though a forward inside the context may turn
        inference mode off and run a backward."""
        with torch.inference_mode(False):
            # Registered first, so that it runs before the multi-gradient hook's own hook
            # on the same parameter: each parameter the backward reaches is marked.
            for p in self.parameters:
                self._hooks.append(p.register_hook(self._marker(p)))
            for module, guard in self._sample_dim_guards:
                self._hooks.append(module.register_forward_pre_hook(guard, with_kwargs=True))
            if self._outside_guard is not None:
                model, guard = self._outside_guard
                self._hooks.append(model.register_forward_hook(guard, with_kwargs=True))
                self._hooks.append(model.register_forward_hook(self._forward_thread_guard(model)))
                enter, leave = self._model_call_tracking(model)
                self._hooks.append(model.register_forward_pre_hook(enter, prepend=True))
                self._hooks.append(model.register_forward_hook(leave, always_call=True))
            for layer in self._layers:
                self._hooks += self._recorder.track_calls(layer)
                if self._outside_guard is not None:
                    # (``model.forward(x)``, or its submodules called one by one, skip
                    # the model's own hook)
                    for name, linear in layer.modules():
                        guard = self._forward_thread_guard(linear, name)
                        self._hooks.append(linear.register_forward_hook(guard))
                if layer.weight_formed_per_call:
                    parametrization = layer.module.parametrizations.weight
                    hook = self._formed_weight_hook(weakref.ref(parametrization))
                    self._hooks.append(parametrization.register_forward_hook(hook))
            if self.parameters:
                self._register_results_hook()
                self._start_hook = torch.autograd.graph.register_multi_grad_hook(
                    self.parameters, self._on_a_backward_reaching_parameters, mode="any"
                )
                self._recorder.watch_stray = self._watch_stray

    def _forward_thread_guard(self, model: nn.Module, linear_name: str | None = None):
        """(clip mode) A forward hook for ``model`` (or one of its Linears, named
        ``linear_name``: called without the model's own call, its hook is skipped)
        refusing a forward on a thread other than the one that entered the context,
        whose torch function mode alone watches for trainable parameters outside the
        model, if its output can join a graph (an output requiring grad, or the model
        run by a reentrant checkpoint's forward, whose output does): a loss built on
        that thread could give one an unclipped gradient, unseen. An evaluation forward
        without grad there is let be (a background evaluation thread). A checkpoint's
        recomputation of the model in the backward (on a device's autograd thread) is
        let be: one inside a backward the watch saw start, or inside a reentrant
        checkpoint's backward (on a torch where ``torch.autograd.backward`` is not a
        torch function, the watch sees ``loss.backward()`` only); and so is a copy of
        the model (``copy.deepcopy`` copies its hooks)."""
        guarded = weakref.ref(model)
        running = self._model_calls_running

        def refuse_forward_on_another_thread(module: nn.Module, args: tuple, output) -> None:
            if module is not guarded() or torch.compiler.is_compiling():
                return  # (a compiled model is refused at the backward)
            if linear_name is not None and getattr(running, "depth", 0):
                # inside the model's call, whose own hook judges its output as it ends
                # (an evaluation forward under no_grad whose model checkpoints a segment)
                return
            if self._thread in (None, threading.get_ident()) or self._recorder.backward_seen():
                return
            if inside_reentrant_checkpoint() or not _can_join_a_graph(output):
                return
            # (its Linear calls, filed as they ran, must not split the next step's)
            self._recorder.segments.forget_this_thread()
            refusals.refuse_forward_on_another_thread(linear_name)

        return refuse_forward_on_another_thread

    def _model_call_tracking(self, model: nn.Module) -> tuple[Callable, Callable]:
        """(clip mode) A forward pre-hook and an always-called forward hook for
        ``model`` keeping, per thread, how many of its calls are running
        (:attr:`_model_calls_running`), for its Linears' thread guards."""
        guarded = weakref.ref(model)
        running = self._model_calls_running

        def enter(module: nn.Module, args: tuple) -> None:
            if module is guarded():
                running.depth = getattr(running, "depth", 0) + 1

        def leave(module: nn.Module, args: tuple, output) -> None:
            # (also after an error in a pre-hook that ran before ``enter``: always_call)
            if module is guarded():
                running.depth = max(getattr(running, "depth", 0) - 1, 0)

        return enter, leave

    def _formed_weight_hook(self, guarded: weakref.ref):
        """A forward hook for the parametrization (``torch.nn.utils.parametrize``) of a
        layer's frozen weight, which forms the weight anew at every access: it files each
        weight formed in :data:`per_sample_recorders_by_weight`, as :meth:`__enter__` does
        a stable weight, so that a Linear call on another thread (a reentrant checkpoint
        recomputing its segment on a device's autograd thread, where no context is open)
        is recorded, matched by its bias, rather than left to give the bias an ordinary
        gradient, refused as one from an unrecorded op. Its entry goes when the weight is
        freed (before its id can be reused) or the context exits."""

        def register_formed_weight(parametrization: nn.Module, args: tuple, weight) -> None:
            if parametrization is not guarded() or not isinstance(weight, torch.Tensor):
                return  # a copy of the model (copy.deepcopy copies its hooks)
            if torch.compiler.is_compiling():
                # Dynamo cannot trace id() and weakref.finalize (with fullgraph=True its
                # error would replace the context's refusal of torch.compile, at the
                # backward); a compiled Linear call consults no recorder anyway
                return
            key = id(weight)
            if key in per_sample_recorders_by_weight:
                return  # (parametrize.cached() returns the same tensor at each access)
            per_sample_recorders_by_weight[key] = self._recorder
            self._formed_weights.append(
                weakref.finalize(weight, per_sample_recorders_by_weight.pop, key, None)
            )

        return register_formed_weight

    def _remove_hooks(self) -> None:
        """Remove every hook :meth:`_register_hooks` registered."""
        self._recorder.watch_stray = None
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        if self._results_hook is not None:
            self._results_hook.remove()
            self._results_hook, self._watched = None, []
        if self._start_hook is not None:
            self._start_hook.remove()
            self._start_hook = None

    # ------------------------------------------------------------------ results
    @property
    def norms(self) -> torch.Tensor:
        """``(B,)``: the L2 norm, over every trainable parameter, of each sample's
        contribution to ``p.grad`` (before clipping); float32 for float16 / bfloat16
        models, whose squared norms would overflow or round away. On the device of the
        model's first recorded Linear (a model split across devices included)."""
        self._ensure_finalised()
        return self._norms

    @property
    def clip_factors(self) -> torch.Tensor:
        """``(B,)``: ``c_i = min(1, max_norm / norms_i)`` (clip mode)."""
        if self.mode != "clip":
            raise RuntimeError(
                f"per_sample_grads: clip_factors exist in mode='clip' only (mode={self.mode!r})"
            )
        self._ensure_finalised()
        return self._factors

    @property
    def batch_size(self) -> int:
        """``B``, the size of the sample dim (dim 0) of the recorded Linear inputs."""
        self._ensure_finalised()
        return self._batch

    def add_noise(
        self, noise_multiplier: float, *, generator: torch.Generator | None = None
    ) -> None:
        r"""DP-SGD's Gaussian mechanism: add :math:`\mathcal{N}(0, (\sigma C)^2)` to every
        element of each clipped ``p.grad`` (``σ = noise_multiplier``, ``C = max_norm``).

        Clip mode only, after the backward, once per context: the noise of one step is
        drawn once (a second draw would leave ``σC·√2`` on ``p.grad`` while the privacy
        accounting assumes ``σ``), so a second call is refused. Each parameter without a
        gradient (its layer was not reached) gets the noise alone, as DP-SGD requires.

        Args:
            noise_multiplier: ``σ ≥ 0``.
            generator: a :class:`torch.Generator` on the parameters' device for
                reproducible noise (default: the global one).

        Raises:
            RuntimeError: not clip mode, nothing was formed (no backward yet, or an
                error inside the context), the noise was already added (also in
                part, by a call that raised while drawing it), or a ``p.grad`` cannot
                take it in place (sparse, expanded, an inference tensor; named, and no
                gradient is changed).
            TypeError: ``noise_multiplier`` is not a number, or ``generator`` is not a
                :class:`torch.Generator` (no gradient is changed).
            ValueError: ``noise_multiplier`` is negative or not finite, the noise std
                ``σ·max_norm`` is beyond the largest number of the gradients' dtype, or
                ``generator`` is not of the parameters' device type (no gradient is changed).

        Examples::

            >>> import torch, torchbp
            >>> model = torchbp.nn.Linear(3, 2)
            >>> x, y = torch.randn(4, 3), torch.tensor([0, 1, 1, 0])
            >>> with torchbp.per_sample_grads(model, mode="clip", max_norm=0.5) as ps:
            ...     torchbp.nn.CrossEntropyLoss(reduction="sum")(model(x), y).backward()
            ...     ps.add_noise(1.1, generator=torch.Generator().manual_seed(0))
            >>> torch.allclose(ps.clip_factors, (0.5 / ps.norms).clamp(max=1))
            True
            >>> ps.add_noise(1.1)
            Traceback (most recent call last):
              ...
            RuntimeError: per_sample_grads: add_noise was already called ...
        """
        if self.mode != "clip":
            raise RuntimeError(
                f"per_sample_grads: add_noise needs mode='clip' (mode={self.mode!r}): noise "
                "calibrated to max_norm protects clipped gradients only"
            )
        arguments.checked_noise_multiplier(noise_multiplier)
        self._ensure_finalised()
        if self._noise_interrupted:
            raise RuntimeError(
                "per_sample_grads: an earlier add_noise call of this context raised while "
                "drawing the noise, after adding it to some parameters' p.grad: this step's "
                "gradients are partly noised, and drawing again would noise those twice; "
                "zero the gradients and redo the step in a new context"
            )
        if self._noised:
            raise RuntimeError(
                "per_sample_grads: add_noise was already called for this context's backward; "
                "DP-SGD adds the noise once per step (a second draw would make its std "
                "σC·√2, not the σC the privacy accounting assumes): open a new context for "
                "the next step"
            )
        std = float(noise_multiplier) * self.max_norm
        _past_the_function_modes(functools.partial(self._noise, noise_multiplier, std, generator))
        self._noised = True

    def _noise(
        self, noise_multiplier: float, std: float, generator: torch.Generator | None
    ) -> None:
        """:meth:`add_noise`'s checks of the gradients and its draws, with std ``σC``."""
        grad_dtypes = [
            gradient_dtype(p) if p.grad is None else p.grad.dtype for p in self.parameters
        ]
        arguments.refuse_unrepresentable_std(grad_dtypes, noise_multiplier, self.max_norm, std)
        arguments.refuse_unusable_generator(self.parameters, generator)
        for p in self.parameters:
            if p.grad is not None:
                refuse_unwritable_grad(p, self._name_of(p), "add the noise")
        with torch.no_grad():
            for p in self.parameters:
                if p.grad is None:
                    p.grad = torch.zeros_like(
                        p, dtype=gradient_dtype(p), memory_format=torch.contiguous_format
                    )
            try:
                # one stream from the generator, chunk by chunk (see torchbp.per_sample.noise)
                add_gaussian_noise_([p.grad for p in self.parameters], std, generator)
            except BaseException:
                self._noise_interrupted = True
                raise

    # ------------------------------------------------------------------ internals
    def _fail(self) -> None:
        """Mark the context failed while it is open: nothing is formed in it, and the
        recorder refuses any later Linear backward before it files anything."""
        self._state = "failed"
        self._recorder.failed = True

    def _backward_cut_short(self) -> bool:
        """Whether a backward reached parameters but never completed (the multi-gradient
        hook fires at its end): an error was raised inside it, and caught."""
        return bool(self._reached) and not self._recorder.finalised

    def _has_traces(self) -> bool:
        return any(layer.traces for layer in self._layers)

    def _release_traces(self) -> None:
        for layer in self._layers:
            layer.traces.clear()

    def _ensure_finalised(self) -> None:
        if self._recorder.finalised:
            return
        if self._backward_cut_short():
            self._fail()  # even if the caller caught the error
        if self._state == "failed" or self._recorder.failed:
            raise RuntimeError(
                "per_sample_grads: nothing was formed (an error was raised inside the context)"
            )
        if self._state == "open" and self._has_traces():
            self._finalise(forms_param_grads=False)
            return
        if not self.parameters:
            why = "every one frozen" if self._model_has_parameters else "it has no parameters"
            raise RuntimeError(
                "per_sample_grads: no backward through the model's Linear layers was "
                "recorded: the model had no trainable parameters when the context was "
                f"created ({why}), so there is nothing to record"
            )
        raise RuntimeError(
            "per_sample_grads: no backward through the model's Linear layers was recorded; "
            "run the forward and loss.backward() inside the context first"
        )

    def _after_backward(self, grads) -> None:
        if self._recorder.finalised:
            refusals.refuse_second_backward()
        # (a gradient in grads came through an op other than a recorded Linear: the
        # parameter's marker has refused it already, before it reached p.grad)
        if self._has_traces():
            self._finalise(forms_param_grads=True)

    def _on_a_backward_reaching_parameters(self, grad) -> None:
        """At the first parameter each backward reaches, before its results are formed:
        refuse one that follows a backward which reached parameters and never completed
        (an error raised inside it, and caught), whose recordings would be formed with
        this one's (the same layers counted twice, or written from half a step); and (clip
        mode) one through a reentrant checkpoint whose segment uses a trainable parameter
        outside the model, whose own backward would give it an unclipped gradient after
        the results are written."""
        if self._recorder.parameters_reached and not self._recorder.finalised:
            self._fail()
            refusals.refuse_backward_after_one_cut_short()
        if self._outside_watch is not None:
            checkpointed = self._outside_watch.checkpointed_parameter()
            if checkpointed is not None:
                self._fail()
                refusals.refuse_checkpointed_outside_parameter(checkpointed)
        self._recorder.parameters_reached = True

    def _register_results_hook(self) -> None:
        """Register the multi-gradient hook that forms the results: it fires once per
        backward, after the gradients of every parameter the backward reaches are
        computed, i.e. after the last recorded Linear backward, and of every watched
        tensor it reaches, which it never does (see :meth:`_watch_stray`)."""
        self._results_hook = torch.autograd.graph.register_multi_grad_hook(
            [*self.parameters, *self._watched], self._after_backward, mode="all"
        )

    def _watch_stray(self, tensors: Sequence[torch.Tensor]) -> None:
        """Make the results wait for the backward of a linear call with trainable
        ``tensors`` that the context refuses at its backward (a Linear outside the model,
        functional_call with new parameters): one that runs after the backward has passed
        every parameter would otherwise come after p.grad was written. The refusal raises
        before those tensors' gradients are computed, so the hook never fires; a call the
        backward does not reach (a forward outside the loss) does not hold it back."""
        known = {id(t) for t in (*self.parameters, *self._watched)}
        new = [t for t in tensors if t.requires_grad and id(t) not in known]
        if not new:
            return
        old_hook, old_watched = self._results_hook, self._watched
        self._watched = [*old_watched, *new]
        try:
            self._register_results_hook()
        except (AttributeError, RuntimeError):
            # inside a torch.func transform, whose tensors' graph cannot be hooked from
            # here (the call is refused at its backward all the same): keep the hook
            self._results_hook, self._watched = old_hook, old_watched
            return
        old_hook.remove()

    def _hold_results_for(self, parameters: list[nn.Parameter]) -> None:
        """(clip mode) Make the results wait for the gradients of ``parameters``, trainable
        parameters outside the model that torch functions were given inside the context,
        as :meth:`_watch_stray` does a refused Linear call's tensors: each one's hook
        refuses it before any p.grad is written, wherever the backward reaches it."""
        if self._results_hook is not None:
            self._watch_stray(parameters)

    def _refuse_stray_gradient(self, p: nn.Parameter) -> None:
        """Raise for a gradient that reached ``p`` through an op other than its Linear
        (see :func:`refusals.refuse_stray_gradient`); nothing is formed after it."""
        if self._recorder.finalised:
            refusals.refuse_second_backward()  # (the results formed stay)
        self._fail()  # even if the caller catches this, nothing is formed
        layer, _ = self._owner(p)
        refusals.refuse_stray_gradient(self._name_of(p), layer_recorded_a_call=bool(layer.traces))

    def _refuse_outside_parameter(self, p: nn.Parameter) -> None:
        """Raise for a trainable parameter outside the model that a backward reached in
        clip mode (see :class:`~torchbp.per_sample.outside_watch.OutsideParameterWatch`);
        nothing is formed after it."""
        self._fail()  # even if the caller catches this, nothing is formed
        refusals.refuse_outside_parameter_gradient(p)

    def _marker(self, p: nn.Parameter):
        def mark_reached(grad):
            if not self._reached and refusals.inside_autograd_grad():
                # checked before the multi-gradient hook's own hook on p, which fails there
                # with torch's internal "_will_engine_execute_node" message
                self._fail()
                raise RuntimeError(refusals.autograd_grad_refusal(self._name_of(p)))
            self._reached.add(id(p))
            if grad is not None:
                # refused here, in p's own hook, which runs before autograd adds the
                # gradient to p.grad (the multi-gradient hook fires only at the last
                # parameter, after the others' gradients were added)
                self._refuse_stray_gradient(p)

        return mark_reached

    def _owner(self, p: nn.Parameter) -> tuple[Layer, str]:
        """The layer that accounts for ``p`` (one of :attr:`parameters`), and whether ``p``
        is its ``"weight"`` or its ``"bias"``."""
        for layer in self._layers:
            for what in ("weight", "bias"):
                if getattr(layer, what) is p:
                    return layer, what
        raise LookupError("per_sample_grads: the parameter is not one of the context's parameters")

    def _name_of(self, p: nn.Parameter) -> str:
        layer, what = self._owner(p)
        return layer.parameter_name(what)

    def _finalise(self, *, forms_param_grads: bool) -> None:
        """Form the results; if that raises (a refusal, running out of memory), nothing
        is formed and the context refuses any later backward."""
        try:
            self._form_results(forms_param_grads)
        except BaseException:
            self._fail()
            raise
        finally:
            self._release_traces()

    def _form_results(self, forms_param_grads: bool) -> None:
        # a parameter replaced, frozen or unfrozen inside the with block: its layer is
        # accounted for wrongly (an unfrozen one's gradient left out or left unclipped)
        self._check_parameters()
        # a backward that reached parameters contributes to theirs only (backward(inputs=)
        # names some): the norms, clipping, grad_sample and statistics are of that
        # contribution, not of every layer it ran through
        accounted = set(self._reached) if forms_param_grads else {id(p) for p in self.parameters}
        with torch.no_grad():
            results = form_results(
                self._layers,
                mode=self.mode,
                max_norm=self.max_norm,
                statistics=self.statistics,
                accounted=accounted,
                forms_param_grads=forms_param_grads,
            )
            self._batch, self._norms, self._factors = results.batch, results.norms, results.factors
            results.write()
            self._recorder.finalised = True


# a plain tensor, made at import: torch.overrides.has_torch_function((_PLAIN,)) tells
# whether a torch function mode is active on this thread
_PLAIN = torch.empty(0)


def _past_the_function_modes(step: Callable[[], None]) -> None:
    """Run ``step()``, torchbp's own work on the model's gradients, as one torch function:
    each torch function mode active on this thread (clip mode's
    :class:`~torchbp.per_sample.outside_watch.OutsideParameterWatch`, a user's) receives it as a
    call of this function and runs it with itself off, as a mode runs ``loss.backward()``,
    so that the torch calls inside ``step`` (add_noise's reads of each ``p.grad``, its
    dtype and strides, the draws: ~20 a parameter) skip the modes' Python dispatch
    (~1.5 µs a call; 130 of the 180 µs the watch added to a DP step of the digits MLP,
    batch 64, of about 1 ms). Without a mode it is a plain call.

    Raises:
        RuntimeError: a mode returned without running the call (``step`` never ran: no
            noise was drawn, which must not pass silently).
    """
    if not has_torch_function((_PLAIN,)):
        step()
        return
    ran = []

    def step_noted() -> None:
        step()
        ran.append(True)

    handle_torch_function(_past_the_function_modes, (_PLAIN,), step_noted)
    if not ran:
        raise RuntimeError(
            "per_sample_grads: a torch function mode active here returned from add_noise's "
            "call (torchbp.per_sample.context._past_the_function_modes) without running it, "
            "so no noise was added: a mode must run the functions it does not handle "
            "(return func(*args, **kwargs))"
        )


def _can_join_a_graph(output: object) -> bool:
    """Whether a forward's ``output`` can join an autograd graph, read as the forward
    ends: grad mode is on (whatever the output holds), a tensor of it requires grad (a
    forward turning grad mode on inside), or the forward runs inside a reentrant
    checkpoint's (with grad mode off), whose output does."""
    return (
        torch.is_grad_enabled()
        or any(t.requires_grad for t in refusals.tensors_in(output))
        or bool(running_checkpoint_segments())
    )


def per_sample_grads(
    model: nn.Module,
    mode: str = "norms",
    max_norm: float | torch.Tensor | None = None,
    *,
    statistics: bool = False,
) -> PerSampleGrads:
    r"""Per-sample gradient norms, per-sample gradients, or per-sample-clipped gradients,
    from the one ordinary ``loss.backward()``.

    Sample ``i``'s gradient ``grad_i`` is its contribution to ``p.grad`` (dim 0 of every
    Linear input is the sample; with ``reduction='mean'`` the contribution carries the
    ``1/B``). The hand-written Linear backward already holds each layer's input ``a`` and
    output gradient ``g``; inside the context it files them, and after the backward
    ``‖grad_i‖`` comes from ``‖g_i‖·‖a_i‖`` per layer (2-D inputs), from ``T × T`` Gram
    matrices or chunked materialisation for ``(B, T, in)`` inputs (the cheaper one),
    never from per-sample gradients.

    Modes:

    - ``"norms"``: ``ps.norms``; ``p.grad`` as without the context.
    - ``"grads"``: also ``p.grad_sample``, shape ``(B, *p.shape)``, for every trainable
      parameter: replaced (not accumulated) by each context; its sum over dim 0 is this
      backward's contribution to ``p.grad``. A context of another mode sets a
      ``p.grad_sample`` left by an earlier one to None (as one without ``statistics``
      does the statistics), so no earlier step's value is read as this step's.
    - ``"clip"``: ``p.grad`` receives ``Σ_i min(1, max_norm/‖grad_i‖) grad_i`` instead of
      ``Σ_i grad_i``, each layer's with one matmul ``(c ⊙ g)ᵀ a``; ``ps.clip_factors``
      holds ``c``.

    In every mode the Linear backward skips ``dW`` and ``db`` and the context forms them
    after the backward (one matmul per layer, as the backward would have), so autograd
    never holds or accumulates them. ``p.grad`` accumulates like autograd's, in
    ``p.grad_dtype`` where that is set (float32 gradients of a bfloat16 model): the result
    is added to a gradient already there (clip mode included, so micro-batches can be
    summed before one noisy step; a sparse one becomes the dense sum, as with autograd,
    and one an in-place add refuses, an expanded or an inference tensor, which autograd
    fails on too, is refused by name before any ``p.grad`` is written), and only for
    the parameters the backward reaches (``loss.backward(inputs=[...])`` names some):
    the norms, the clipping, ``p.grad_sample`` and the statistics are then of their
    contribution alone (zeros for the others). Gradients formed by the context are not
    differentiable: a backward with ``create_graph=True`` is refused at its first Linear
    backward, before anything is formed. Gradient hooks on the accounted parameters see
    no gradient, since autograd carries none for them: a ``Tensor.register_hook`` hook is
    called with ``None``, and a post-accumulate-grad hook (an optimizer stepped in the
    backward, DDP's gradient reduction) runs before the context forms ``p.grad`` (that of
    the last parameter the backward reaches just after, before any ``add_noise``: an
    optimizer stepped there would step it without the noise); neither is supported.

    When the results are formed: a multi-gradient hook on the trainable parameters fires
    once the backward has passed all of them it reaches, so right after
    ``loss.backward()`` returns, ``ps.norms``, ``p.grad`` and ``p.grad_sample`` are ready.
    If the backward reaches no trainable parameter (``torch.autograd.grad`` w.r.t. the
    input only), ``p.grad`` is left alone, as autograd would, and the rest is formed on
    the first read of ``ps.norms`` / ``ps.batch_size`` or on leaving the context.
    Recorded tensors are released once formed.

    One context records one forward and backward (several forward calls of the model,
    or of one layer, before that backward are fine: a sample's contributions are summed,
    row ``i`` of every call being sample ``i``; so micro-batches of other samples need a
    context each, whose clipped gradients add up in ``p.grad``: in one context, equal-sized
    ones would be clipped row by row together, silently).
    A second backward (also after one that reached no trainable parameter, such as
    ``torch.autograd.grad`` w.r.t. the input for an adversarial example: open the context
    after it), a backward after the ``with`` block of a forward inside it, nesting, and
    re-entering are errors; so is ``torch.autograd.grad`` with respect to a trainable
    parameter (the context forms parameter gradients into ``p.grad`` only; for CPU
    parameters the call raises this, on other devices torch's own refusal is named so
    as it leaves the ``with`` block); an exception inside the ``with`` restores plain
    behaviour (results formed before it stay, nothing is formed after it). A backward
    that reached the parameters but was cut short by an error forms nothing, even if
    the caller catches the error inside the ``with`` block (an error while the context
    forms the results, such as running out of memory for ``p.grad_sample``, included:
    every result is formed before any ``p.grad`` or attribute is written, so a backward
    adding to gradients already there holds its own, up to ``|θ|`` numbers more than
    autograd's one layer at a time, until they are added); the context then refuses any
    later backward, one of a forward made before included. So does an error inside a
    Linear backward (running out of memory for its input gradient). Not seen: an error
    from outside the context (a hook on an activation) between two calls of one Linear,
    before that backward reached any parameter: a later backward in the context is then
    formed with the cut one's filed half; open a new context after catching an error.

    Supported models: trainable parameters must belong to :class:`torchbp.nn.Linear` modules
    (built directly or by :func:`torchbp.convert`); parameter-free modules and modules with
    only frozen parameters are trusted to act per sample. Trainable means ``requires_grad``
    when the context is created: a parameter frozen, unfrozen, replaced or added after that,
    before the backward, is refused by name (on entering, or at the backward). Refused
    before any forward, by name: modules with other trainable parameters (an unconverted
    ``nn.Linear``, Conv, LayerNorm with affine, Embedding, a torchbp Linear subclass's own
    extra parameters such as a LoRA adapter, ...), a Linear with complex trainable parameters
    (the formulas are real ones) or with a trainable weight or bias that is not an
    ``nn.Parameter`` (a plain tensor ``torch.func.functional_call`` left in a module
    listed twice, or one assigned after ``del lin.weight``), a Linear with a trainable
    parameter and a bias parametrized by ``torch.nn.utils.parametrize`` (formed anew by
    every forward, even when frozen; a frozen parametrized weight with a trainable bias is
    served: its calls are matched by the bias), a Linear with a 1-D weight or
    a trainable bias of another shape than ``(out_features,)``, a MultiheadAttention with
    a trainable ``out_proj`` (its forward applies it to the output flattened to
    ``(T·B, E)``, not per sample), BatchNorm in training mode,
    softmax-like modules, GLU and CosineSimilarity along dim 0, ``Flatten(start_dim=0)``, and
    the fused :class:`torchbp.nn.LinearCrossEntropyLoss`; at the forward, by name, one whose dim is
    picked from the input's ndim (softmax's ``dim=None``: dim 0 for 3-D inputs; a negative
    dim; Softmax2d's dim -3) where it lands on dim 0, and one made to mix samples after the
    context was created (``model.train()`` on a BatchNorm, ``dim`` set to 0). In clip mode, a
    trainable ``nn.Parameter`` outside the model that its output depends on (a second model
    run before it, a parameter its forward uses without registering it) is refused at the
    model's forward, by shape (it would receive an unclipped gradient), and so is an input
    made by a reentrant activation checkpoint (``use_reentrant=True``, whose forward keeps
    no graph, so its parameters cannot be seen); one given to any torch function inside
    the context (used after the model, in the loss: a learnable temperature or class
    bias), or used by a reentrant checkpoint's segment without the model registering it,
    is refused at the backward, before any gradient is written (a plain tensor with
    ``requires_grad``, not an ``nn.Parameter``, is not: it may be sample data whose own
    gradient is wanted). Any torchbp or
    torch loss works on the model's output (reduction, class weights, label smoothing,
    ignore_index), as long as the loss itself has no trainable parameters. Eager mode only
    (no ``torch.compile``, no autocast; both are refused at the backward); activation
    checkpointing works with ``use_reentrant=False``. With ``use_reentrant=True`` only a
    segment that holds every trainable Linear does (frozen layers may precede or follow
    it, in segments of their own too): the
    segment runs a backward of its own, and the first of the two backwards to pass the
    trainable layers it reaches ends the recording, so a trainable Linear before or after
    the segment, or one in another segment (a checkpoint called twice included), is
    refused at the first Linear backward, naming the layers of each segment, before any
    gradient is formed or written.

    DP-SGD step (noise ``N(0, σ²C²)`` on the summed clipped gradient, then the average)::

        with torchbp.per_sample_grads(model, mode="clip", max_norm=C) as ps:
            loss = F.cross_entropy(model(x), y, reduction="sum")
            loss.backward()
            ps.add_noise(sigma)
        for p in ps.parameters:
            p.grad /= expected_batch_size   # the fixed batch size; q·N under Poisson sampling
                                            # (not ps.batch_size there: a draw can be empty)
        optimizer.step()

    With a fixed batch size ``B`` the same update comes without the division pass from
    ``reduction="mean"`` and ``max_norm=C/B`` (the noise then is ``σC/B``, as it should).
    An empty batch (Poisson sampling) gives zero clipped gradients; ``add_noise`` still
    adds the noise.

    Args:
        model: the module whose trainable parameters are accounted for.
        mode: ``"norms"`` | ``"grads"`` | ``"clip"``.
        max_norm: the clipping bound ``C > 0`` (a number or a 0-dim real tensor, read once
            at creation); required by, and only by, ``"clip"``.
        statistics: also set, for every trainable parameter, ``p.sum_grad_squared``
            (``Σ_i grad_i²``, element-wise; 2-D inputs: ``(g²)ᵀ(a²)``) and
            ``p.grad_variance`` (``Σ_i grad_i²/B − (Σ_i grad_i/B)²``, the variance over the
            batch of the contributions, unclipped in every mode; with ``reduction='mean'``
            multiply by ``B²`` for the variance of the per-sample-loss gradients; an empty
            batch gives zeros for both). Both are formed in float32 for float16 / bfloat16
            models and stored in their dtype.

    Shape:
        ``ps.norms`` and ``ps.clip_factors``: ``(B,)``. ``p.grad_sample``:
        ``(B, *p.shape)``.

    Returns:
        a :class:`PerSampleGrads` context manager.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, the model has a module per-sample
            gradients cannot pass (named), ``mode='clip'`` has a ``max_norm`` that is
            not a number (``None`` included), or ``statistics`` is not a bool (and, at
            the forward inside the context, a module made to mix samples since).
        ValueError: an unknown mode, a ``max_norm`` that is not positive and finite, or
            one given to a mode other than ``"clip"``, a Linear's trainable parameter not
            yet initialized (a lazy module before its first forward), a trainable
            parameter shared by two Linear modules that do not share both weight and bias
            (two that do, or share the weight with no bias in either, are one layer called
            twice), and, at the forward inside the context, a module whose dim lands on
            dim 0.
        RuntimeError: nesting or re-entering, a parameter frozen, unfrozen or replaced
            since the context was created (on entering), and at the backward a use the
            context refuses (a second backward, ``torch.autograd.grad`` w.r.t. a
            parameter, autocast or ``torch.compile``, such a parameter change, ...),
            named; in clip mode, at the forward, a trainable parameter outside the
            model that its output depends on, and at the backward one used after the
            model or inside a reentrant checkpoint; and the model's forward, or a call
            of one of its Linears, with grad (or inside a reentrant checkpoint's forward;
            or, on CPU, a backward through its Linears) on a thread other than the one
            that entered the context, whose torch function mode alone watches for
            such parameters.

    Examples::

        >>> import torch, torchbp
        >>> from torchbp.per_sample import per_sample_grads
        >>> model = torch.nn.Sequential(torchbp.nn.Linear(4, 8), torchbp.nn.ReLU(),
        ...                             torchbp.nn.Linear(8, 3))
        >>> x, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])
        >>> with per_sample_grads(model, mode="clip", max_norm=0.1) as ps:
        ...     torchbp.nn.CrossEntropyLoss(reduction="sum")(model(x), y).backward()
        >>> ps.norms.shape
        torch.Size([5])
        >>> torch.allclose(ps.clip_factors, (0.1 / ps.norms).clamp(max=1))
        True
    """
    return PerSampleGrads(model, mode, max_norm, statistics=statistics)
