"""Per-sample gradients, their norms and per-sample clipping from one ordinary backward.

:func:`per_sample_grads` opens a context in which torchbp's Linear backward files each
layer's input and output gradient; after ``loss.backward()`` the context forms
``ps.norms``, ``p.grad_sample`` or the clipped ``p.grad`` from them (see its docstring).

Modules: ``context`` (the context manager's lifecycle: enter, record, finish, exit),
``arguments`` (the checks of what the user passes), ``recorder`` (what the Linear Function
calls), ``refusals`` (the uses of autograd the context refuses from its hooks),
``results`` (forming the norms, ``p.grad_sample``, the statistics and ``p.grad`` after the
backward), ``model_check`` (which modules are allowed), ``formulas`` (the per-layer math),
``noise`` (DP-SGD's Gaussian noise), ``memory`` (huge-page buffers for ``p.grad_sample``).
"""

from torchbp.per_sample.context import MODES, PerSampleGrads, per_sample_grads

__all__ = ["per_sample_grads", "PerSampleGrads", "MODES"]
