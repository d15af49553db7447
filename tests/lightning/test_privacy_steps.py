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
        **{
            "default_root_dir": tmp_path,
            "accelerator": "cpu",
            "logger": False,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "num_sanity_val_steps": 0,
            "limit_val_batches": 0,
            "max_steps": 1,
            **trainer_kwargs,
        }
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

    with pytest.raises(RuntimeError, match=r"noise was not added.*super\(\)\.backward\(loss\)"):
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


@pytest.mark.parametrize(
    "options",
    [
        dict(class_weight=[0.5, 2.0, 1.0], label_smoothing=0.2),
        dict(activation="gelu", bias=False),
        dict(activation="tanh", hidden_sizes=[]),
    ],
    ids=["weighted-smoothed", "gelu-no-bias", "logistic"],
)
def test_dp_clipped_sum_is_exact_with_every_loss_and_network_option(options):
    """The model options that change the loss (class weights, label smoothing) or the network
    (activation, bias, no hidden layer) keep each sample's gradient its own: the clipped sum
    equals Σ_i clip_C(∇ℓ_i) formed independently with torch.func in float64."""
    from torchbp.lightning import ERMClassifier
    from torchbp.lightning.privacy import PrivacyAccountant

    torch.manual_seed(0)
    C = 1.5
    options = {"hidden_sizes": [8], **options}
    model = ERMClassifier(
        input_size=5,
        num_classes=3,
        privacy=Privacy(max_grad_norm=C, noise_multiplier=1e-12),
        **options,
    )
    model.accountant = PrivacyAccountant(model.privacy, sample_rate=0.5, epochs=1)
    model._expected_batch = 1.0
    x, y = torch.randn(12, 5) * torch.linspace(0.1, 4, 12)[:, None], torch.tensor([0, 1, 2] * 4)
    params = {k: v.detach().double() for k, v in model.net.named_parameters()}
    model.backward(model._private_training_step((x, y)))

    reference = ERMClassifier(input_size=5, num_classes=3, backend="torch", **options).double()
    weight = reference.class_weight

    def sample_loss(p, xi, yi):
        logits = torch.func.functional_call(reference.net, p, (xi[None].double(),))
        return torch.nn.functional.cross_entropy(
            logits,
            yi[None],
            weight=weight,
            label_smoothing=options.get("label_smoothing", 0.0),
            reduction="sum",
        )

    grads = torch.func.vmap(torch.func.grad(sample_loss), in_dims=(None, 0, 0))(params, x, y)
    norms = torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in grads.values()))
    assert (norms > C).any() and (norms < C).any()
    factors = (C / norms).clamp(max=1.0)
    for name, p in model.net.named_parameters():
        g = grads[name]
        clipped = (factors.view(-1, *[1] * (g.dim() - 1)) * g).sum(0)
        torch.testing.assert_close(p.grad.double(), clipped, rtol=1e-4, atol=1e-6)


def test_a_subclass_training_step_without_super_is_refused_before_the_optimizer_step(tmp_path):
    """A training_step override computing the mean loss itself never opened the per-sample
    clipping: the fit released plain gradients, without clipping or noise, and reported
    epsilon 0 (the accountant counted no step). Refused before the optimizer step."""
    from torchbp.lightning import ERMClassifier

    class OwnTrainingStep(ERMClassifier):
        def training_step(self, batch, batch_idx):
            x, y = batch
            return self.loss(self(x), y)

    with pytest.raises(RuntimeError, match=r"noise was not added.*super\(\)\.training_step"):
        _one_step(tmp_path, OwnTrainingStep)


@pytest.mark.parametrize("monitor", ["train/loss", "train/acc"])
@pytest.mark.parametrize("kind", ["ModelCheckpoint", "EarlyStopping"])
def test_monitoring_a_metric_of_the_private_batches_is_refused(tmp_path, kind, monitor):
    """train/loss and train/acc are computed from the private batches without noise: a
    ModelCheckpoint keeping the best by them, or an EarlyStopping stopping by them, chose
    the released model by the training data beyond what epsilon covers. Refused before
    any step."""
    import pytorch_lightning.callbacks as callbacks

    with pytest.raises(ValueError, match=rf"privacy \(DP-SGD\): {kind} monitors '{monitor}'"):
        _one_step(
            tmp_path,
            callbacks=[getattr(callbacks, kind)(monitor=monitor)],
            enable_checkpointing=True,
        )


def test_monitoring_epsilon_or_a_validation_metric_is_allowed(tmp_path):
    from pytorch_lightning.callbacks import EarlyStopping

    stop = EarlyStopping(monitor="train/epsilon", mode="max", check_on_train_epoch_end=True)
    model, _ = _one_step(tmp_path, callbacks=[stop])
    assert model.accountant.steps == 1
