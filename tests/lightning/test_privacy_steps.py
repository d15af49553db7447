"""DP-SGD steps that hooks, trainer options or the data could alter: what each releases, and
what the accountant counts."""

from __future__ import annotations

import pytest
import torch

from torchbp.lightning.data import DigitsDataModule
from torchbp.lightning.privacy import Privacy

pytest.importorskip("opacus")

#: noise negligible against the clipped sum: a step is the clipped sum over L, checkable
_TINY_NOISE = Privacy(max_grad_norm=1.0, noise_multiplier=1e-9)


def _one_step(tmp_path, model_class=None, data=None, **trainer_kwargs):
    """``(model, step)``: a DP model after one SGD(lr=1) step on digits, and that step
    (parameters before minus after, flattened); ``data`` changes the DataModule first."""
    import pytorch_lightning as pl

    from torchbp.lightning import ERMClassifier

    pl.seed_everything(0)
    dm = DigitsDataModule(batch_size=64, poisson_sampling=True, standardize=False)
    if data is not None:
        dm.setup("fit")
        data(dm)
    model = (model_class or ERMClassifier)(
        input_size=64,
        num_classes=10,
        hidden_sizes=[16],
        privacy=_TINY_NOISE,
        optimizer=lambda params: torch.optim.SGD(params, lr=1.0),
    )
    trainer = pl.Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        max_steps=1,
        **trainer_kwargs,
    )
    before = torch.cat([p.detach().flatten() for p in model.parameters()])
    trainer.fit(model, datamodule=dm)
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    return model, before - after


def test_a_subclass_on_after_backward_sees_the_noisy_step(tmp_path):
    """The noise was added in the module's on_after_backward: a subclass overriding it (the
    hook Lightning documents for inspecting gradients) without super() released the clipped
    sum without noise and without 1/L (a step 64x the DP one), the accountant counted no
    step, and the per_sample_grads context stayed open. The noise is added in backward now:
    the hook sees the noisy gradient, which is the step taken."""
    from torchbp.lightning import ERMClassifier

    class InspectsGradients(ERMClassifier):
        def on_after_backward(self):
            self.seen = torch.cat([p.grad.flatten() for p in self.parameters()])

    _, dp_step = _one_step(tmp_path)
    model, step = _one_step(tmp_path, InspectsGradients)
    torch.testing.assert_close(step, dp_step)
    torch.testing.assert_close(model.seen, step)
    assert model.accountant.steps == 1
    assert model._per_sample is None


def test_a_subclass_backward_without_super_is_refused_before_the_optimizer_step(tmp_path):
    """A backward override that does not call super().backward never adds the noise: the
    step is refused before the optimizer releases the clipped sum."""
    from torchbp.lightning import ERMClassifier

    class OwnBackward(ERMClassifier):
        def backward(self, loss, *args, **kwargs):
            loss.backward()

    with pytest.raises(RuntimeError, match=r"noise was not added.*super\(\)\.backward"):
        _one_step(tmp_path, OwnBackward)


def test_gradient_clip_val_clips_the_noisy_step(tmp_path):
    """Lightning's gradient_clip_val runs after the noise (on_before_optimizer_step's turn):
    a function of the released noisy gradient alone, which DP allows (post-processing).
    The step is the DP step scaled to the clip value."""
    _, dp_step = _one_step(tmp_path)
    model, clipped = _one_step(tmp_path, gradient_clip_val=1e-3)
    assert dp_step.norm() > 1e-2
    # (atol: the rounding of parameters near 0.1, in float32)
    torch.testing.assert_close(clipped, dp_step * (1e-3 / dp_step.norm()), rtol=1e-3, atol=5e-8)
    assert model.accountant.steps == 1


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true", "16-true"])
def test_reduced_precision_is_refused_before_any_step(tmp_path, precision):
    """bf16-mixed failed inside the first step (per_sample_grads refuses autocast);
    bf16-true trained, with a clipped sum that one sample moves by up to ~1.1·C in
    bfloat16, beyond the sensitivity C the noise is calibrated for. Both are refused
    before the fit starts, naming the precision."""
    with pytest.raises(ValueError, match=rf"privacy \(DP-SGD\).*precision.*{precision}"):
        _one_step(tmp_path, precision=precision)


def test_float64_trains_the_float32_step(tmp_path):
    _, dp_step = _one_step(tmp_path)
    model, step = _one_step(tmp_path, precision="64-true")
    torch.testing.assert_close(step.float(), dp_step, rtol=1e-4, atol=1e-6)
    assert model.accountant.steps == 1


def test_a_non_finite_sample_gradient_is_refused_not_released(tmp_path):
    """A NaN feature in one training row made that sample's gradient NaN, its clip factor
    NaN and the whole noisy step NaN: the model's weights became NaN, telling that the
    batch held such a row whatever the noise. The step is refused; the weights stay."""

    def spoil_every_row(dm):
        dm.splits["train"].tensors[0][:, 5] = float("nan")

    with pytest.raises(RuntimeError, match="inf or NaN"):
        _one_step(tmp_path, data=spoil_every_row)
