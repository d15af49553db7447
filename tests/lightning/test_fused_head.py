"""ERMClassifier(fused_head=True): the last Linear + cross-entropy through linear_cross_entropy.

Same parameters/state_dict as unfused, same loss and gradients (up to rounding), no (N, C)
logits saved for backward, and a short CLI fit with the same metrics as the unfused one.
"""

from __future__ import annotations

import pytest
import torch
from tests.lightning.lightning_helpers import CONFIGS, epoch_series, read_metrics, run_cli

from torchbp.lightning import ERMClassifier

# backend="torch" fuses through torch.nn.functional.linear_cross_entropy (torch 2.13+):
# feature-detected, so its cases skip (with the reason) on a torch without it.
NATIVE_FUSED = hasattr(torch.nn.functional, "linear_cross_entropy")
BACKENDS = (
    "torchbp",
    pytest.param(
        "torch",
        marks=pytest.mark.skipif(
            not NATIVE_FUSED, reason="this torch has no torch.nn.functional.linear_cross_entropy"
        ),
    ),
)
# (rtol, atol) of loss and gradients, fused vs unfused; measured differences are ~1e-16
# (float64) and ~1e-7 (float32), i.e. rounding of a differently ordered computation.
TOL = {torch.float64: (1e-12, 1e-13), torch.float32: (1e-5, 1e-6)}


def make(backend: str, fused: bool, dtype=torch.float32, **kwargs) -> ERMClassifier:
    torch.manual_seed(7)
    kwargs = {"input_size": 6, "num_classes": 5, "hidden_sizes": [8, 7], **kwargs}
    return ERMClassifier(backend=backend, fused_head=fused, **kwargs).to(dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_parameters_and_state_dict(backend):
    a, b = make(backend, False), make(backend, True)
    assert [type(l) for l in a.net] == [type(l) for l in b.net]
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0, msg=k)
    assert [n for n, _ in a.named_parameters()] == [n for n, _ in b.named_parameters()]
    assert b.hparams.fused_head is True and a.hparams.fused_head is False
    x = torch.randn(4, 6)
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)  # forward is the unfused one
    # an unfused checkpoint loads into a fused model (and back)
    b.load_state_dict(a.state_dict())
    a.load_state_dict(b.state_dict())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"class_weight": [1.0, 2.0, 0.5, 1.5, 0.25], "label_smoothing": 0.1},
        {"class_weight": [1.0, 2.0, 0.5, 1.5, 0.25]},
        {"hidden_sizes": [], "bias": False},
        {"activation": "tanh", "label_smoothing": 0.2},
    ],
    ids=["plain", "weight+smoothing", "weight", "logreg-nobias", "tanh+smoothing"],
)
def test_same_loss_gradients_and_metrics(backend, dtype, kwargs):
    torch.manual_seed(1)
    x = torch.randn(37, 6, dtype=dtype)
    y = torch.randint(5, (37,))
    losses, grads, stats = [], [], []
    for fused in (False, True):
        m = make(backend, fused, dtype, **kwargs)
        loss = m._step((x, y), m.train_loss, m.train_metrics)
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad for n, p in m.named_parameters()})
        stats.append((m.train_loss.compute(), m.train_metrics.compute()))
    rtol, atol = TOL[dtype]
    assert losses[0].dtype == losses[1].dtype == dtype
    torch.testing.assert_close(losses[1], losses[0], rtol=rtol, atol=atol)
    assert list(grads[0]) == list(grads[1])
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=rtol, atol=atol, msg=n)
    # the metrics see the same logits (the fused step recomputes them without a graph)
    torch.testing.assert_close(stats[1][0], stats[0][0], rtol=rtol, atol=atol)
    assert stats[1][1] == stats[0][1]


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_step_saves_no_logits(backend):
    """With ``fused_head`` nothing of shape (N, C) is saved for backward (torch's own path
    is chunked when label_smoothing == 0)."""
    n, c = 40, 9  # N, C distinct from every other dim
    x, y = torch.randn(n, 6), torch.randint(c, (n,))
    for fused in (False, True):
        m = make(backend, fused, num_classes=c, hidden_sizes=[8])
        shapes = []

        def pack(t, shapes=shapes):
            shapes.append(tuple(t.shape))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            m._step((x, y), m.train_loss, m.train_metrics).backward()
        assert ((n, c) in shapes) is not fused, (fused, shapes)


def test_torch_backend_without_native_op_is_a_config_error(monkeypatch):
    import torch.nn.functional as F

    monkeypatch.delattr(F, "linear_cross_entropy", raising=False)
    with pytest.raises(ValueError, match="fused_head=True with backend='torch' needs"):
        ERMClassifier(input_size=4, num_classes=3, backend="torch", fused_head=True)
    ERMClassifier(input_size=4, num_classes=3, backend="torch")  # unfused still fine
    ERMClassifier(input_size=4, num_classes=3, backend="torchbp", fused_head=True)


def test_cli_fit_fused_matches_unfused(tmp_path):
    """2 epochs of the digits job, fused vs unfused: same metrics up to rounding-level drift
    of the optimiser trajectory (losses within 1e-5 relative, measured ~1e-7; accuracies within
    one sample, measured identical)."""
    runs = {}
    for name, flag in (("unfused", "false"), ("fused", "true")):
        run_cli(
            "fit",
            "--config",
            str(CONFIGS / "digits.yaml"),
            f"--run_dir={tmp_path}",
            f"--run_name={name}",
            "--trainer.max_epochs=2",
            f"--model.fused_head={flag}",
        )
        runs[name] = read_metrics(tmp_path / name / "version_0" / "metrics.csv")
    a, b = runs["unfused"], runs["fused"]
    for key in ("train/loss", "val/loss"):
        sa, sb = epoch_series(a, key), epoch_series(b, key)
        assert len(sa) == len(sb) == 2
        assert sb == pytest.approx(sa, rel=1e-5), key
    for key in ("train/acc", "val/acc", "val/f1"):
        sa, sb = epoch_series(a, key), epoch_series(b, key)
        assert sb == pytest.approx(sa, abs=3e-3), key  # <= 1 of ~270-1150 samples
    ta = next(r for r in a if "test/acc" in r)
    tb = next(r for r in b if "test/acc" in r)
    assert tb["test/loss"] == pytest.approx(ta["test/loss"], rel=1e-5)
    assert tb["test/acc"] == pytest.approx(ta["test/acc"], abs=3e-3)
