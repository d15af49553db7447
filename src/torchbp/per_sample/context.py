"""``per_sample_grads``: per-sample gradient norms, gradients or clipped gradients from the
one ordinary backward pass."""

from __future__ import annotations

import functools
import math
import numbers

import torch
from torch import nn

from torchbp.autograd.linear import per_sample_recorders_by_weight, per_sample_recording
from torchbp.per_sample import formulas, memory
from torchbp.per_sample.model_check import (
    Layer,
    attributable_layers,
    refuse_changed_parameters,
    sample_dim_guards,
    trainability,
)
from torchbp.per_sample.noise import add_gaussian_noise_
from torchbp.per_sample.recorder import (
    Recorder,
    running_on_this_thread,
)

MODES = ("norms", "grads", "clip")


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
        if mode not in MODES:
            raise ValueError(
                f"per_sample_grads: mode must be one of {', '.join(map(repr, MODES))}, got {mode!r}"
            )
        self.mode = mode
        self.max_norm = _checked_max_norm(mode, max_norm)
        if not isinstance(statistics, bool):
            raise TypeError(f"per_sample_grads: statistics must be a bool, got {statistics!r}")
        self.statistics = statistics
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
        self._recorder = Recorder(self._layers, self._check_parameters)
        self._registered_weights: list[int] = []  # ids in per_sample_recorders_by_weight
        self._state = "new"  # -> "open" -> "closed" / "failed"
        self._hooks: list = []
        # the multi-gradient hook that forms the results, on the parameters and on the
        # trainable tensors of every linear call refused at its backward (see _watch_stray)
        self._results_hook = None
        self._watched: list[torch.Tensor] = []
        # the multi-gradient hook that fires once per backward, at the first parameter it
        # reaches (see _on_a_backward_reaching_parameters)
        self._start_hook = None
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
        weights = [id(layer.module.weight) for layer in self._layers]
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
        self._state = "open"
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        per_sample_recording.recorder = None
        # the ids registered on entering (a weight replaced since has another id)
        for w in self._registered_weights:
            per_sample_recorders_by_weight.pop(w, None)
        self._registered_weights = []
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
        if exc is not None and self._backward_cut_short() and _passed_through_autograd_grad(tb):
            # torch's own refusal, from a hook on a device's autograd thread, which the
            # marker cannot see: named here, as it leaves the with block. Only for a call
            # that reached the parameters and never completed: an error from a later
            # torch.autograd.grad (after a finished backward, whose own refusals name
            # themselves) is not about the parameters
            raise RuntimeError(_autograd_grad_refusal("the model's parameters")) from exc
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
            for layer in self._layers:
                self._hooks += self._recorder.track_calls(layer)
            if self.parameters:
                self._register_results_hook()
                self._start_hook = torch.autograd.graph.register_multi_grad_hook(
                    self.parameters, self._on_a_backward_reaching_parameters, mode="any"
                )
                self._recorder.watch_stray = self._watch_stray

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
        if not _is_number(noise_multiplier):
            raise TypeError(
                f"per_sample_grads: noise_multiplier must be a number, got {noise_multiplier!r}"
            )
        if not (_is_finite(noise_multiplier) and noise_multiplier >= 0):
            raise ValueError(
                "per_sample_grads: noise_multiplier must be finite and >= 0, "
                f"got {noise_multiplier}"
            )
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
        self._refuse_unrepresentable_std(noise_multiplier, std)
        self._refuse_unusable_generator(generator)
        for p in self.parameters:
            if p.grad is not None:
                self._refuse_unwritable_grad(p, "add the noise")
        with torch.no_grad():
            for p in self.parameters:
                if p.grad is None:
                    p.grad = torch.zeros_like(p, memory_format=torch.contiguous_format)
            try:
                # one stream from the generator, chunk by chunk (see torchbp.per_sample.noise)
                add_gaussian_noise_([p.grad for p in self.parameters], std, generator)
            except BaseException:
                self._noise_interrupted = True
                raise
        self._noised = True

    # ------------------------------------------------------------------ internals
    def _refuse_unusable_generator(self, generator: object) -> None:
        """Raise, before any gradient changes, if ``generator`` is neither ``None`` nor a
        :class:`torch.Generator` of every parameter's device type (torch.randn would fail at
        the first parameter it cannot draw for, after the noise of the others was added)."""
        if generator is None:
            return
        if not isinstance(generator, torch.Generator):
            raise TypeError(
                "per_sample_grads: add_noise's generator must be a torch.Generator or None, "
                f"got {type(generator).__name__}"
            )
        # the device type, which is what torch.randn checks (not on meta, where it
        # draws nothing and takes any generator)
        for device in dict.fromkeys(p.device.type for p in self.parameters):
            if device not in (generator.device.type, "meta"):
                raise ValueError(
                    f"per_sample_grads: add_noise's generator is on {generator.device.type}, "
                    f"but parameters are on {device}: give a generator of the parameters' "
                    "device (or None for each device's global one)"
                )

    def _refuse_unrepresentable_std(self, noise_multiplier: float, std: float) -> None:
        """Raise, before any gradient changes, if the noise std ``σC`` is not a finite
        number of every parameter's dtype (the noise would be ±inf, or torch would fail
        midway through the parameters)."""
        for dtype in dict.fromkeys(p.dtype for p in self.parameters):
            largest = torch.finfo(dtype).max
            if not (math.isfinite(std) and std <= largest):
                raise ValueError(
                    f"per_sample_grads: the noise std noise_multiplier * max_norm = "
                    f"{noise_multiplier} * {self.max_norm} = {std} is beyond the largest "
                    f"{dtype} number ({largest:.4g}), the dtype of the gradients"
                )

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
            _refuse_second_backward()
        # (a gradient in grads came through an op other than a recorded Linear: the
        # parameter's marker has refused it already, before it reached p.grad)
        if self._has_traces():
            self._finalise(forms_param_grads=True)

    def _on_a_backward_reaching_parameters(self, grad) -> None:
        """At the first parameter each backward reaches, before its results are formed:
        refuse one that follows a backward which reached parameters and never completed
        (an error raised inside it, and caught), whose recordings would be formed with
        this one's (the same layers counted twice, or written from half a step)."""
        if self._recorder.parameters_reached and not self._recorder.finalised:
            self._fail()
            raise RuntimeError(
                "per_sample_grads: a backward reached the model's parameters after an "
                "earlier backward in this context was cut short by an error (caught) before "
                "it completed; the two cannot be told apart, so nothing is formed: open a "
                "new context for the step"
            )
        self._recorder.parameters_reached = True

    def _register_results_hook(self) -> None:
        """Register the multi-gradient hook that forms the results: it fires once per
        backward, after the gradients of every parameter the backward reaches are
        computed, i.e. after the last recorded Linear backward, and of every watched
        tensor it reaches, which it never does (see :meth:`_watch_stray`)."""
        self._results_hook = torch.autograd.graph.register_multi_grad_hook(
            [*self.parameters, *self._watched], self._after_backward, mode="all"
        )

    def _watch_stray(self, tensors: list[torch.Tensor]) -> None:
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

    def _refuse_stray_gradient(self, p: nn.Parameter) -> None:
        """Raise for a gradient that reached ``p`` through an op other than its Linear:
        inside the context the Linear backward hands dW, db to the recorder, not autograd."""
        if self._recorder.finalised:
            _refuse_second_backward()  # (the results formed stay)
        self._fail()  # even if the caller catches this, nothing is formed
        raise RuntimeError(
            f"per_sample_grads: {self._name_of(p)} received a gradient from an op "
            f"other than its recorded Linear call ({self._stray_gradient_hint(p)}); "
            "that gradient cannot be attributed to samples"
        )

    def _stray_gradient_hint(self, p: nn.Parameter) -> str:
        """The likely causes of a gradient reaching ``p`` other than through its layer."""
        layer, _ = self._owner(p)
        if layer.traces:
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

    def _marker(self, p: nn.Parameter):
        def mark_reached(grad):
            if not self._reached and _inside_autograd_grad():
                # checked before the multi-gradient hook's own hook on p, which fails there
                # with torch's internal "_will_engine_execute_node" message
                self._fail()
                raise RuntimeError(_autograd_grad_refusal(self._name_of(p)))
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
        return f"parameter {layer.name + '.' if layer.name else ''}{what}"

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
        batch = self._common_batch()
        # a backward that reached parameters contributes to theirs only (backward(inputs=)
        # names some): the norms, clipping, grad_sample and statistics are of that
        # contribution, not of every layer it ran through
        accounted = set(self._reached) if forms_param_grads else {id(p) for p in self.parameters}
        with torch.no_grad():
            traces = {id(layer): _joined(layer) for layer in self._layers if layer.traces}
            self._batch = batch
            self._norms = self._sample_norms(traces, batch, accounted)
            if self.mode == "clip":
                # c_i = min(1, C / ‖grad_i‖)   (a zero norm gets 1)
                self._factors = formulas.clip_factors(self._norms, self.max_norm)
            # free the last step's results before forming new ones, and drop those this
            # context does not form (a stale p.grad_sample of an earlier grads-mode step
            # would be read as this step's, and keep B×|θ| alive)
            _reset(self.parameters, ("grad_sample",), formed=self.mode == "grads")
            _reset(self.parameters, ("sum_grad_squared", "grad_variance"), formed=self.statistics)
            clip = self.mode == "clip"
            needs_sums = self.statistics or (forms_param_grads and not clip)
            # Every result is formed before any is written (an error midway, such as running
            # out of memory for one layer's p.grad_sample, leaves every p.grad as it was)
            attributes: list[tuple[nn.Parameter, str, torch.Tensor]] = []
            grads: list[tuple[nn.Parameter, torch.Tensor]] = []
            # Output side first, as the backward would: each layer's recording is dropped
            # once used, so the big early-layer gradients meet few recordings still held.
            for layer in reversed(self._layers):
                trace = traces.pop(id(layer), None)
                layer.traces.clear()
                sums = None
                if trace is not None and needs_sums:
                    # the variance needs Σ_i G_i in float32 at least (see _form_statistics)
                    dtype = formulas.norm_dtype(trace[1].dtype) if self.statistics else None
                    sums = _grad_sums(layer, *trace, dtype=dtype)
                if self.mode == "grads":
                    attributes += self._form_samples(layer, trace, batch, accounted)
                if self.statistics:
                    attributes += self._form_statistics(layer, trace, sums, batch, accounted)
                if forms_param_grads and trace is not None:
                    layer_grads = _clipped_sums(layer, *trace, self._factors) if clip else sums
                    grads += [
                        self._accumulation(p, grad.to(p.dtype))  # (sums: maybe wider)
                        for p, grad in zip((layer.weight, layer.bias), layer_grads)
                        if _is_in(p, accounted)
                    ]
            # writing allocates nothing and cannot fail (an in-place add is checked first)
            for p, name, value in attributes:
                setattr(p, name, value)
            for p, value, in_place in grads:
                if in_place:
                    p.grad.add_(value)
                else:
                    p.grad = value
            self._recorder.finalised = True

    def _accumulation(self, p: nn.Parameter, grad: torch.Tensor) -> tuple:
        """How ``grad`` joins ``p.grad``, as autograd's accumulation does, decided and
        formed before any ``p.grad`` is written: ``(p, grad, True)`` to add it in place to
        the strided ``p.grad`` there, ``(p, value, False)`` to set ``p.grad`` to ``value``:
        ``grad`` laid out like ``p`` where there is none (autograd's gradient layout
        contract), the dense sum where ``p.grad`` is sparse.

        Raises:
            RuntimeError: ``p.grad`` refuses an in-place add (an expanded or an inference
                tensor, which autograd's accumulation fails on too), naming ``p``.
        """
        if p.grad is None:
            return p, _laid_out_like(p, grad), False
        if p.grad.layout != torch.strided:
            return p, grad + p.grad, False
        self._refuse_unwritable_grad(p, "add this backward's gradient to it")
        return p, grad, True

    def _refuse_unwritable_grad(self, p: nn.Parameter, action: str) -> None:
        """Raise, naming ``p``, if its ``p.grad`` refuses an in-place add, to ``action``."""
        reason = _in_place_refusal(p.grad)
        if reason is not None:
            raise RuntimeError(
                f"per_sample_grads: p.grad of {self._name_of(p)} is {reason}, which cannot "
                f"be written in place to {action}; set it to None or to a plain tensor "
                "(p.grad = p.grad.clone()) first"
            )

    def _common_batch(self) -> int:
        """``B``, the size of dim 0 of every recorded Linear input.

        Raises:
            RuntimeError: the inputs disagree, naming the layers that saw each size.
        """
        layers_by_batch: dict[int, list[str]] = {}
        for layer in self._layers:
            for size in dict.fromkeys(g.shape[0] for _, g in layer.traces):
                layers_by_batch.setdefault(size, []).append(repr(layer.name))
        if len(layers_by_batch) == 1:
            return next(iter(layers_by_batch))
        where = "; ".join(
            f"{size} at Linear {', '.join(names)}"
            for size, names in sorted(layers_by_batch.items())
        )
        raise RuntimeError(
            "per_sample_grads: the recorded Linear inputs disagree on the sample dim "
            f"(sizes {sorted(layers_by_batch)}): {where}; dim 0 of every Linear input must "
            "be the sample (a tensor shared by the samples, of batch 1, cannot go through a "
            "trainable Linear)"
        )

    def _sample_norms(self, traces: dict, batch: int, accounted: set[int]) -> torch.Tensor:
        """``‖grad_i‖ = (Σ_layers ‖G_i‖² + ‖β_i‖²)^½`` over the parameters whose ids are
        ``accounted``, shape ``(B,)``, in the widest layer's
        :func:`~torchbp.per_sample.formulas.norm_dtype` (a float64 head on a float32 body
        gives float64 norms), on the device of the first recorded layer in module order:
        each layer's are formed on its own device and gathered there (a model split
        across devices).

        On the CPU from the squares as they are, and again scaled
        (:func:`~torchbp.per_sample.formulas.layer_norms`) if a norm came out inf or NaN
        (float32's squares overflow from norms of 1.8e19 on, and inf·0 made a zero
        gradient's norm NaN); elsewhere scaled at once, since telling would wait for the
        device. Scaled norms are right wherever they fit their dtype."""
        gs = [g for _, g in traces.values()]
        dtype = functools.reduce(torch.promote_types, (formulas.norm_dtype(g.dtype) for g in gs))
        device = gs[0].device
        scaled = device.type != "cpu"
        norms = self._combined_norms(traces, batch, accounted, dtype, device, scaled)
        if not scaled and not bool(norms.isfinite().all()):
            norms = self._combined_norms(traces, batch, accounted, dtype, device, scaled=True)
        return norms

    def _combined_norms(
        self,
        traces: dict,
        batch: int,
        accounted: set[int],
        dtype: torch.dtype,
        device: torch.device,
        scaled: bool,
    ) -> torch.Tensor:
        """The layers' norms (see :meth:`_sample_norms`), combined on ``device``."""
        layer_norms = [torch.zeros(batch, dtype=dtype, device=device)]
        for layer in self._layers:
            if id(layer) not in traces:
                continue
            weight, bias = (_is_in(p, accounted) for p in (layer.weight, layer.bias))
            if weight or bias:
                a, g = traces[id(layer)]
                norms = formulas.layer_norms(a, g, weight=weight, bias=bias, scaled=scaled)
                layer_norms.append(norms.to(device, dtype))
        # ‖grad_i‖ = ‖(‖grad_i^(1)‖, ‖grad_i^(2)‖, ...)‖ over the layers
        return formulas.combined_norms(torch.stack(layer_norms), dim=0, scaled=scaled)

    def _form_samples(self, layer: Layer, trace, batch: int, accounted: set[int]) -> list:
        """``(p, "grad_sample", value)`` for the layer's parameters: zeros for one whose id
        is not ``accounted`` (the backward contributed nothing to it)."""
        samples = []
        for p, is_weight in ((layer.weight, True), (layer.bias, False)):
            if p is None:
                continue
            if trace is None or id(p) not in accounted:
                value = memory.zeros((batch, *p.shape), like=p)
            elif is_weight:
                value = formulas.weight_grad_samples(*trace)
            else:
                value = formulas.bias_grad_samples(trace[1])
            samples.append((p, "grad_sample", value))
        return samples

    def _form_statistics(self, layer: Layer, trace, sums, batch: int, accounted: set[int]) -> list:
        """``(p, name, value)`` for ``p.sum_grad_squared`` and ``p.grad_variance`` of the
        layer's parameters, formed from the sums (in :func:`formulas.norm_dtype`) and
        stored in the parameter's dtype; zeros for a parameter whose id is not
        ``accounted``."""
        statistics = []
        for p, is_weight in ((layer.weight, True), (layer.bias, False)):
            if p is None:
                continue
            if trace is None or id(p) not in accounted:
                sum_squared, total = p.new_zeros(p.shape), p.new_zeros(p.shape)
            elif is_weight:
                sum_squared, total = formulas.weight_sum_grad_squared(*trace), sums[0]
            else:
                sum_squared, total = formulas.bias_sum_grad_squared(trace[1]), sums[1]
            variance = formulas.variance(sum_squared, total, batch)
            statistics.append((p, "sum_grad_squared", sum_squared.to(p.dtype)))
            statistics.append((p, "grad_variance", variance.to(p.dtype)))
        return statistics


def _refuse_second_backward() -> None:
    raise RuntimeError(
        "per_sample_grads: a second backward reached the model's parameters inside "
        "one context; a context records one backward: open a new one per step"
    )


def _autograd_grad_refusal(what: str) -> str:
    return (
        f"per_sample_grads: torch.autograd.grad with respect to {what} is not supported "
        "inside the context, which forms the parameters' gradients after a backward, into "
        "p.grad; call loss.backward() inside the context and read p.grad, p.grad_sample or "
        "ps.norms (torch.autograd.grad with respect to inputs only is fine)"
    )


def _inside_autograd_grad() -> bool:
    """Whether a call of ``torch.autograd.grad`` is on this thread's Python stack (a hook of
    a CPU backward runs on the calling thread; on a device's autograd thread this sees
    none, and ``__exit__`` names torch's own refusal instead)."""
    return running_on_this_thread(_AUTOGRAD_GRAD_CODE)


def _passed_through_autograd_grad(tb) -> bool:
    """Whether an exception's traceback ``tb`` runs through ``torch.autograd.grad``."""
    while tb is not None:
        if tb.tb_frame.f_code is _AUTOGRAD_GRAD_CODE:
            return True
        tb = tb.tb_next
    return False


_AUTOGRAD_GRAD_CODE = torch.autograd.grad.__code__


def _is_in(p: nn.Parameter | None, ids: set[int]) -> bool:
    return p is not None and id(p) in ids


def _checked_max_norm(mode: str, max_norm: object) -> float | None:
    """``max_norm`` as a float: a positive finite number (or a 0-dim real tensor of one) in
    clip mode, ``None`` otherwise.

    Raises:
        TypeError: clip mode without a number (``None`` included).
        ValueError: clip mode with one that is not positive and finite, or another mode
            with one.
    """
    if mode != "clip":
        if max_norm is not None:
            raise ValueError(
                f"per_sample_grads: max_norm is used only by mode='clip' (mode={mode!r})"
            )
        return None
    if _is_real_scalar_tensor(max_norm):
        max_norm = max_norm.item()  # (as torch.nn.utils.clip_grad_norm_ takes one)
    if not _is_number(max_norm):
        raise TypeError(
            f"per_sample_grads: mode='clip' needs max_norm, a positive number; got {max_norm!r}"
        )
    if not (_is_finite(max_norm) and max_norm > 0):
        raise ValueError(f"per_sample_grads: max_norm must be positive and finite, got {max_norm}")
    return float(max_norm)


def _is_real_scalar_tensor(value: object) -> bool:
    """A 0-dim tensor of a real dtype (not bool, not complex), off the meta device."""
    return (
        isinstance(value, torch.Tensor)
        and value.dim() == 0
        and not (value.dtype == torch.bool or value.is_complex() or value.is_meta)
    )


def _is_finite(value: numbers.Real) -> bool:
    """Whether ``value`` is a finite float (an int too large for one is not)."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _is_number(value: object) -> bool:
    """A real number: Python's or numpy's (``True`` is not one here)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _grad_sums(layer: Layer, a, g, dtype: torch.dtype | None = None) -> tuple:
    """``(dL/dW, dL/db)`` of the recorded backward (``None`` for a frozen one), formed in
    ``dtype`` (default: ``g``'s)."""
    weight = None if layer.weight is None else formulas.weight_grad_sum(a, g, dtype)
    bias = None if layer.bias is None else formulas.bias_grad_sum(g, dtype)
    return weight, bias


def _clipped_sums(layer: Layer, a, g, factors: torch.Tensor) -> tuple:
    """``(Σ_i c_i G_i, Σ_i c_i β_i)`` (``None`` for a frozen one), in
    :func:`formulas.norm_dtype`: small output gradients times small factors fall below
    float16's normal range (6e-5), where ``c_i g_i`` would keep a few bits."""
    dtype = formulas.norm_dtype(g.dtype)
    # (the factors are on the norms' device, which may not be this layer's)
    scaled = formulas.scale_samples(g.to(dtype), factors.to(g.device))
    return _grad_sums(layer, a, scaled, dtype)


def _reset(parameters, names: tuple[str, ...], *, formed: bool) -> None:
    """Set the result attributes ``names`` of ``parameters`` to None: on every parameter
    where this context forms them anew (``formed``), else only where an earlier context
    left a value (no attribute is added)."""
    for p in parameters:
        for name in names:
            if formed or getattr(p, name, None) is not None:
                setattr(p, name, None)


def _joined(layer: Layer):
    """The layer's traces as one ``(a, g)``: every forward call's positions side by side.

    Several calls' are taken off the layer, so that each call's own ``a`` and ``g`` are
    freed once joined (every ``a`` before the ``g`` are): a layer called several times
    (tied Linears included) holds a copy beyond its recording only while one side is
    joined, not through the norms and the rest of the results."""
    if len(layer.traces) == 1:
        return layer.traces[0]
    a_parts, g_parts = [a for a, _ in layer.traces], [g for _, g in layer.traces]
    layer.traces.clear()
    a = None if a_parts[0] is None else _cat_releasing(a_parts)
    return a, _cat_releasing(g_parts)


def _cat_releasing(parts: list[torch.Tensor]) -> torch.Tensor:
    """``parts`` concatenated along the positions (dim 1); the list is emptied, dropping
    its references to them."""
    joined = torch.cat(parts, 1)
    parts.clear()
    return joined


def _laid_out_like(p: nn.Parameter, grad: torch.Tensor) -> torch.Tensor:
    """``grad`` with the strides of ``p`` where ``p`` is dense and not overlapping (a
    weight stored transposed), as autograd stores a new gradient; else ``grad``."""
    if grad.stride() == p.stride():
        return grad
    out = torch.empty_like(p)  # p's strides, where they are dense and not overlapping
    return grad if out.stride() == grad.stride() else out.copy_(grad)


def _in_place_refusal(grad: torch.Tensor) -> str | None:
    """Why an in-place add into ``grad`` would raise (torch's own checks: a layout other
    than strided, an inference tensor outside inference mode, elements sharing memory),
    or ``None``."""
    if grad.layout != torch.strided:
        return f"a {grad.layout} tensor"
    if grad.is_inference():
        return "an inference tensor (made under torch.inference_mode)"
    if any(stride == 0 and size > 1 for stride, size in zip(grad.stride(), grad.shape)):
        return "an expanded tensor (its elements share memory)"
    return None


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
    never holds or accumulates them. ``p.grad`` accumulates like autograd's: the result
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
    backward, DDP's gradient reduction) runs before the context forms ``p.grad``; neither
    is supported.

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
    parameter and a weight or bias parametrized by ``torch.nn.utils.parametrize`` (formed
    anew by every forward, even when frozen), a Linear with a 1-D weight or
    a trainable bias of another shape than ``(out_features,)``, a MultiheadAttention with
    a trainable ``out_proj`` (its forward applies it to the output flattened to
    ``(T·B, E)``, not per sample), BatchNorm in training mode,
    softmax-like modules, GLU and CosineSimilarity along dim 0, ``Flatten(start_dim=0)``, and
    the fused :class:`torchbp.nn.LinearCrossEntropyLoss`; at the forward, by name, one whose dim is
    picked from the input's ndim (softmax's ``dim=None``: dim 0 for 3-D inputs; a negative
    dim; Softmax2d's dim -3) where it lands on dim 0, and one made to mix samples after the
    context was created (``model.train()`` on a BatchNorm, ``dim`` set to 0). Any torchbp or
    torch loss works on the model's output (reduction, class weights, label smoothing,
    ignore_index), as long as the loss itself has no trainable parameters. Eager mode only
    (no ``torch.compile``, no autocast; both are refused at the backward); activation
    checkpointing works with ``use_reentrant=False``. With ``use_reentrant=True`` only a
    segment that holds every trainable Linear does (frozen layers may follow it): the
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
            named.

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
