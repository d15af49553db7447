"""per_sample_grads: refusals before the forward, misuse errors, cleanup, nesting."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import torchbp
from torchbp.autograd.linear import per_sample_recording
from torchbp.per_sample import per_sample_grads


def mlp(*middle: nn.Module) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(torchbp.nn.Linear(4, 6), *middle, torchbp.nn.Linear(6, 3))


def step(model, x=None, target=None):
    x = torch.randn(5, 4) if x is None else x
    target = torch.tensor([0, 1, 2, 0, 1]) if target is None else target
    torchbp.functional.cross_entropy(model(x), target).backward()


class WithOwnParameter(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(6))

    def forward(self, x):
        return x * self.scale


@pytest.mark.parametrize(
    ("middle", "message"),
    [
        (nn.BatchNorm1d(6), r"'1' \(BatchNorm1d\) normalises with statistics of the whole batch"),
        (nn.BatchNorm1d(6), r"mixes samples.*\(remove it, or switch it to eval mode with running"),
        (nn.BatchNorm1d(6, affine=False), r"'1' \(BatchNorm1d\).*mixes samples"),
        (nn.LazyBatchNorm1d(affine=False), r"'1' \(LazyBatchNorm1d\).*mixes samples"),
        (nn.Linear(6, 6), r"'1' \(Linear\) has trainable parameters.*torchbp.convert"),
        (nn.LayerNorm(6), r"'1' \(LayerNorm\) has trainable parameters \(weight, bias\)"),
        (nn.Conv1d(1, 1, 1), r"'1' \(Conv1d\) has trainable parameters"),
        (nn.Softmax(dim=0), r"'1' \(Softmax\) normalises along dim 0"),
        (nn.Softmax(dim=0), r"undefined through it \(remove it, or give it a dim other than 0\)$"),
        (torchbp.nn.LogSoftmax(dim=0), r"'1' \(LogSoftmax\) normalises along dim 0"),
        (nn.Flatten(0), r"'1' \(Flatten\) flattens the sample dim"),
        (nn.Flatten(0), r"undefined through it \(remove it, or give it start_dim=1\)$"),
        (nn.GLU(dim=0), r"'1' \(GLU\) gates one half by the other along dim 0"),
        (WithOwnParameter(), r"'1' \(WithOwnParameter\) has trainable parameters \(scale\)"),
        (torchbp.nn.LinearCrossEntropyLoss(6, 3), r"'1' \(LinearCrossEntropyLoss\) is not supp"),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, nn.Module) else "",
)
def test_refused_before_the_forward(middle, message):
    model = mlp(middle)
    with pytest.raises(TypeError, match=message):
        per_sample_grads(model)
    assert getattr(per_sample_recording, "recorder", None) is None


def test_root_module_named():
    with pytest.raises(TypeError, match=r"the model \(Linear\)"):
        per_sample_grads(nn.Linear(3, 2))


def test_allowed_modules_pass():
    bn = nn.BatchNorm1d(6).eval().requires_grad_(False)  # running stats: per sample
    conv = nn.Conv1d(1, 1, 1).requires_grad_(False)  # frozen: nothing to attribute
    model = mlp(
        nn.ReLU(),
        nn.Dropout(0.0),
        nn.Identity(),
        nn.Flatten(),
        bn,
        torchbp.nn.GELU(),
        nn.Unflatten(1, (1, 6)),
        conv,
        nn.Flatten(),
        nn.Softmax(dim=-1),
    )
    with per_sample_grads(model) as ps:
        step(model)
    assert ps.norms.shape == (5,)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"mode": "per_sample"}, ValueError, "mode must be one of 'norms', 'grads', 'clip'"),
        ({"mode": "clip"}, TypeError, "mode='clip' needs max_norm"),
        ({"mode": "clip", "max_norm": -1.0}, ValueError, "max_norm must be positive"),
        ({"mode": "clip", "max_norm": float("inf")}, ValueError, "max_norm must be positive"),
        ({"mode": "norms", "max_norm": 1.0}, ValueError, "max_norm is used only by mode='clip'"),
        ({"mode": "clip", "max_norm": torch.ones(2)}, TypeError, "needs max_norm, a positive"),
        ({"mode": "clip", "max_norm": torch.tensor(True)}, TypeError, "needs max_norm"),
        ({"mode": "clip", "max_norm": torch.tensor(-1.0)}, ValueError, "must be positive"),
        ({"mode": "clip", "max_norm": torch.tensor(math.nan)}, ValueError, "must be positive"),
        ({"statistics": "yes"}, TypeError, "statistics must be a bool, got 'yes'"),
        ({"statistics": 1}, TypeError, "statistics must be a bool, got 1"),
    ],
)
def test_argument_errors(kwargs, error, message):
    with pytest.raises(error, match=message):
        per_sample_grads(mlp(), **kwargs)


@pytest.mark.parametrize(
    "max_norm", [torch.tensor(0.5), torch.tensor(0.5, dtype=torch.float64, requires_grad=True)]
)
def test_max_norm_as_a_0_dim_tensor_clips_as_the_number(max_norm):
    """torch.nn.utils.clip_grad_norm_ takes max_norm as a float or a tensor; a 0-dim
    real tensor (with grad too: nothing flows back through a clip factor) was refused
    with a TypeError. It is read once, as a float."""
    model, x = mlp(), torch.randn(6, 4)
    with per_sample_grads(model, mode="clip", max_norm=0.5) as expected:
        model(x).sum().backward()
    model.zero_grad()
    with per_sample_grads(model, mode="clip", max_norm=max_norm) as ps:
        model(x).sum().backward()
    assert ps.max_norm == 0.5 and type(ps.max_norm) is float
    torch.testing.assert_close(ps.clip_factors, expected.clip_factors, rtol=0, atol=0)


def test_model_must_be_a_module():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        per_sample_grads([torchbp.nn.Linear(2, 2)])


def test_nested_refused_and_outer_still_works():
    model = mlp(nn.ReLU())
    with per_sample_grads(model) as outer:
        with pytest.raises(RuntimeError, match="cannot be nested"):
            with per_sample_grads(model):
                pass
        step(model)
    assert outer.norms.shape == (5,)


def test_entered_once():
    model = mlp()
    ps = per_sample_grads(model)
    with ps:
        step(model)
    with pytest.raises(RuntimeError, match="entered once"):
        with ps:
            pass


def test_exception_inside_cleans_up():
    model = mlp(nn.ReLU())
    with pytest.raises(KeyError):
        with per_sample_grads(model, mode="clip", max_norm=1e-3) as ps:
            model(torch.randn(5, 4))
            raise KeyError("boom")
    assert getattr(per_sample_recording, "recorder", None) is None
    with pytest.raises(RuntimeError, match="nothing was formed"):
        _ = ps.norms
    # plain training again: autograd's gradients, no hook left behind
    model.zero_grad(set_to_none=True)
    x = torch.randn(5, 4)
    step(model, x)
    twin = torchbp.convert(mlp(nn.ReLU()), to="torch")
    step(twin, x)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad)


def test_exception_in_forward_cleans_up():
    model = mlp()
    with pytest.raises(RuntimeError):
        with per_sample_grads(model):
            model(torch.randn(5, 7))  # wrong feature size
    assert getattr(per_sample_recording, "recorder", None) is None


def test_norms_before_backward():
    model = mlp()
    with per_sample_grads(model) as ps:
        with pytest.raises(RuntimeError, match="no backward .* was recorded"):
            _ = ps.norms


def test_second_backward_refused():
    model = mlp(nn.Tanh())
    x, target = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])
    with per_sample_grads(model, mode="clip", max_norm=1.0):
        loss = torchbp.functional.cross_entropy(model(x), target)
        loss.backward(retain_graph=True)
        with pytest.raises(RuntimeError, match="second backward"):
            loss.backward()


def test_second_step_in_one_context_refused():
    model = mlp(nn.Tanh())
    with per_sample_grads(model, mode="clip", max_norm=1.0):
        step(model)
        with pytest.raises(RuntimeError, match="second backward"):
            step(model)


def test_evaluation_forward_after_backward_is_fine():
    model = mlp(nn.Tanh())
    with per_sample_grads(model, mode="clip", max_norm=1.0) as ps:
        step(model)
        with torch.no_grad():
            model(torch.randn(3, 4))
        norms = ps.norms
    assert norms.shape == (5,)


def test_linear_outside_the_model_refused_at_backward():
    model = mlp()
    head = torchbp.nn.Linear(3, 3)
    with per_sample_grads(model, mode="clip", max_norm=1.0) as ps:
        out = head(model(torch.randn(5, 4)))
        with pytest.raises(RuntimeError, match=r"weight of shape \(3, 3\) is not a torchbp.nn"):
            out.sum().backward()
    with pytest.raises(RuntimeError, match="nothing was formed"):
        _ = ps.norms


def test_a_refusal_midway_through_the_backward_forms_nothing():
    """The backward records the model's last layer, then meets a Linear that is not the
    model's: the caller catches the error, and neither the norms nor p.grad are formed
    from the half-recorded backward."""
    model = mlp(nn.Tanh())
    stray = torchbp.nn.Linear(6, 6)  # not a module of the model
    with per_sample_grads(model, mode="clip", max_norm=1.0) as ps:
        out = model[2](stray(model[1](model[0](torch.randn(5, 4)))))
        with pytest.raises(RuntimeError, match=r"weight of shape \(6, 6\) is not a torchbp.nn"):
            out.sum().backward()
        with pytest.raises(RuntimeError, match="nothing was formed"):
            _ = ps.norms
    with pytest.raises(RuntimeError, match="nothing was formed"):
        _ = ps.norms
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("what", ["0.weight", "0.bias", "1.bias"])
@pytest.mark.parametrize("mode", ["norms", "grads", "clip"])
def test_parameter_used_outside_its_linear_refused(mode, what):
    model = mlp()
    with per_sample_grads(model, mode=mode, max_norm=1.0 if mode == "clip" else None) as ps:
        out = model(torch.randn(5, 4))
        penalty = model.get_parameter(what).square().sum()  # not attributable to a sample
        with pytest.raises(RuntimeError, match=rf"parameter {what} received a gradient"):
            (out.sum() + penalty).backward()
    with pytest.raises(RuntimeError, match="nothing was formed"):
        _ = ps.norms


@pytest.mark.parametrize("what", ["0.weight", "0.bias", "1.weight", "1.bias"])
@pytest.mark.parametrize("use", ["penalty", "tied"])
def test_refused_stray_gradient_never_reaches_p_grad(use, what):
    """A gradient reaching a parameter through an op other than its Linear (a penalty on
    it, or a weight tied into a native op on the data: an unclipped per-sample gradient)
    is refused, and p.grad of every parameter keeps the earlier micro-batch's value:
    the stray gradient is not added to it before the refusal."""
    model = mlp()
    with per_sample_grads(model, mode="clip", max_norm=1.0):
        step(model)
    before = [p.grad.clone() for p in model.parameters()]
    param = model.get_parameter(what)
    with per_sample_grads(model, mode="clip", max_norm=1.0):
        out = model(torch.randn(5, 4))
        if use == "penalty":
            stray = param.square().sum()
        elif param.dim() == 2:  # tied into torch's own linear, on the data
            stray = torch.nn.functional.linear(torch.randn(5, param.shape[1]), param).sum()
        else:
            stray = (torch.randn(5, param.shape[0]) * param).sum()
        with pytest.raises(RuntimeError, match=rf"parameter {what} received a gradient"):
            (out.sum() + stray).backward()
    for name, p, b in zip(dict(model.named_parameters()), model.parameters(), before):
        torch.testing.assert_close(p.grad, b, rtol=0, atol=0, msg=f"{name}'s p.grad changed")


def test_unbatched_input_refused():
    model = mlp()
    with per_sample_grads(model) as ps:
        out = model(torch.randn(4))
        with pytest.raises(
            ValueError,
            match=r"Linear '1' got an input of shape \(6,\); it needs a leading sample dim",
        ):
            out.sum().backward()
    with pytest.raises(RuntimeError, match="nothing was formed"):
        _ = ps.norms


@pytest.mark.parametrize("to_sparse", [torch.Tensor.to_sparse, torch.Tensor.to_sparse_csr])
def test_sparse_input_refused_by_name(to_sparse):
    # failed inside the recorder: 'reshape is not implemented for sparse tensors'
    model = nn.Sequential(torchbp.nn.Linear(4, 3))
    with per_sample_grads(model, mode="norms") as ps:
        out = model(to_sparse(torch.randn(5, 4)))
        with pytest.raises(ValueError, match=r"Linear '0' got a torch.sparse_\w+ input"):
            out.sum().backward()
    with pytest.raises(RuntimeError, match="nothing was formed"):
        _ = ps.norms


def test_inconsistent_sample_dims_refused():
    model = mlp()
    with per_sample_grads(model) as ps:
        loss = model(torch.randn(5, 4)).sum() + model(torch.randn(3, 4)).sum()
        with pytest.raises(RuntimeError, match=r"disagree on the sample dim \(sizes \[3, 5\]\)"):
            loss.backward()
    with pytest.raises(RuntimeError, match="nothing was formed"):
        _ = ps.norms


def test_clip_factors_and_noise_need_clip_mode():
    model = mlp()
    with per_sample_grads(model, mode="norms") as ps:
        step(model)
    with pytest.raises(RuntimeError, match="clip_factors exist in mode='clip' only"):
        _ = ps.clip_factors
    with pytest.raises(RuntimeError, match="add_noise needs mode='clip'"):
        ps.add_noise(1.0)


def test_add_noise_arguments():
    model = mlp()
    with per_sample_grads(model, mode="clip", max_norm=1.0) as ps:
        step(model)
    with pytest.raises(ValueError, match="noise_multiplier must be finite and >= 0"):
        ps.add_noise(-1.0)
    with pytest.raises(TypeError, match="noise_multiplier must be a number"):
        ps.add_noise("1")


def test_formed_on_exit_when_backward_skips_the_parameters():
    # autograd.grad w.r.t. the input only: the parameter hook never fires
    model = mlp(nn.Tanh())
    x = torch.randn(5, 4, requires_grad=True)
    with per_sample_grads(model, mode="grads") as ps:
        (gx,) = torch.autograd.grad(model(x).sum(), x)
    assert ps.norms.shape == (5,) and bool((ps.norms > 0).all())
    assert model[0].weight.grad_sample.shape == (5, 6, 4)
    assert all(p.grad is None for p in model.parameters())  # as autograd.grad leaves them


@pytest.mark.parametrize("which", ["parameters", "input_and_weight"])
def test_autograd_grad_wrt_parameters_refused_by_name(which):
    """torch.autograd.grad w.r.t. a parameter cannot get the context's gradients (formed
    after a backward, into p.grad): a torchbp error says so and what to do, instead of
    torch's 'A leaf node was passed to _will_engine_execute_node' from inside its hooks."""
    model = mlp(torchbp.nn.ReLU())
    x = torch.randn(5, 4, requires_grad=True)
    wrt = list(model.parameters()) if which == "parameters" else [x, model[2].weight]
    with per_sample_grads(model) as ps:
        loss = model(x).square().sum()
        with pytest.raises(
            RuntimeError, match=r"per_sample_grads: torch.autograd.grad .*loss.backward\(\)"
        ):
            torch.autograd.grad(loss, wrt)
        with pytest.raises(RuntimeError, match="nothing was formed"):
            _ = ps.norms
    assert all(p.grad is None for p in model.parameters())
    step(model)  # plain training afterwards
    assert all(p.grad is not None for p in model.parameters())


def test_autograd_grad_wrt_parameters_named_on_leaving_the_context(monkeypatch):
    """Where the parameters' hooks run on a device's autograd thread, the call's own stack
    is out of sight and torch refuses it in its words: named as it leaves the block."""
    from torchbp.per_sample import refusals

    monkeypatch.setattr(refusals, "inside_autograd_grad", lambda: False)
    model = mlp(torchbp.nn.ReLU())
    with pytest.raises(RuntimeError, match=r"torch.autograd.grad with respect to the model's"):
        with per_sample_grads(model):
            torch.autograd.grad(model(torch.randn(5, 4)).sum(), list(model.parameters()))
    assert per_sample_recording.recorder is None


@pytest.mark.parametrize(
    "module, bad, good, message",
    [
        (nn.Softmax(), (5, 2, 4), (5, 4), r"'1' \(Softmax\) .*dim=None.*3-D input"),
        (torchbp.nn.LogSoftmax(), (5, 2, 4), (5, 3, 2, 4), r"'1' \(LogSoftmax\) .*dim=None"),
        (nn.Softmin(dim=-3), (5, 2, 4), (5, 3, 2, 4), r"'1' \(Softmin\) .*dim=-3"),
        (nn.Flatten(start_dim=-2), (5, 4), None, r"'1' \(Flatten\) .*start_dim=-2"),
        (nn.Softmax2d(), (5, 2, 4), (5, 3, 2, 4), r"'1' \(Softmax2d\) .*dim -3.*\(B, C, H, W\)"),
        (nn.GLU(dim=-2), (5, 4), (5, 2, 4), r"'1' \(GLU\) with dim=-2 acts along dim 0"),
    ],
)
def test_dim_resolving_to_the_sample_dim_refused_at_the_forward(module, bad, good, message):
    """dim=None (softmax picks dim 0 for 1-D and 3-D inputs) or a negative dim can land on
    the sample dim, which only the input's shape tells: the samples were mixed and the
    norms silently wrong; refused at the forward, by name."""
    model = mlp(module)
    with pytest.raises(ValueError, match=message):
        with per_sample_grads(model):
            model(torch.randn(*bad))
    assert per_sample_recording.recorder is None
    if good is not None:  # the same module on an input where it acts per sample
        with per_sample_grads(model) as ps:
            model(torch.randn(*good)).sum().backward()
        assert ps.norms.shape == (5,)


def test_model_without_trainable_parameters():
    model = mlp().requires_grad_(False)
    x = torch.randn(5, 4, requires_grad=True)
    with per_sample_grads(model) as ps:
        model(x).sum().backward()
    assert ps.parameters == []
    with pytest.raises(RuntimeError, match="no backward"):
        _ = ps.norms


@pytest.mark.parametrize("read", ["norms", "add_noise"])
def test_model_without_trainable_parameters_named_as_the_reason(read):
    """A DP step on a model whose every parameter is frozen, the backward run inside the
    context: reading the results was refused as if no backward had run ('run the forward
    and loss.backward() inside the context first'); the refusal says the model had no
    trainable parameters when the context was created."""
    model = mlp().requires_grad_(False)
    x = torch.randn(5, 4, requires_grad=True)
    with per_sample_grads(model, mode="clip", max_norm=1.0) as ps:
        model(x).sum().backward()
        with pytest.raises(RuntimeError, match="no trainable parameters when the context"):
            _ = ps.norms if read == "norms" else ps.add_noise(1.0)


def test_model_without_any_parameter_not_said_to_have_them_frozen():
    """A model with no parameter at all (only activations): reading the results said its
    parameters were 'every one frozen', sending the user to look for a requires_grad_(False)
    that is not there; the refusal says the model has no parameters."""
    model = nn.Sequential(torchbp.nn.Tanh())
    x = torch.randn(5, 4, requires_grad=True)
    with per_sample_grads(model) as ps:
        model(x).sum().backward()
        with pytest.raises(RuntimeError, match="no trainable parameters") as refused:
            _ = ps.norms
    assert "frozen" not in str(refused.value)
    assert "no parameters" in str(refused.value)


def test_compiled_model_refused_at_backward():
    model = mlp(nn.Tanh())
    compiled = torch.compile(model, backend="eager")
    with per_sample_grads(model, mode="clip", max_norm=1.0):
        out = compiled(torch.randn(5, 4))
        with pytest.raises(RuntimeError, match="received a gradient .* torch.compile"):
            out.sum().backward()


def test_autocast_refused_at_backward():
    model = mlp()
    with per_sample_grads(model):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(torch.randn(5, 4))
        with pytest.raises(RuntimeError, match="a weight cast by autocast"):
            out.float().sum().backward()


def test_backward_after_the_context_refused():
    model = mlp(nn.Tanh())
    with per_sample_grads(model, mode="clip", max_norm=1.0):
        out = model(torch.randn(5, 4))
    with pytest.raises(RuntimeError, match="ran after its per_sample_grads context had closed"):
        out.sum().backward()


def test_fused_linear_cross_entropy_on_a_model_weight_refused():
    model = mlp(nn.ReLU())
    head = model[2]
    with per_sample_grads(model, mode="clip", max_norm=1.0):
        hidden = model[1](model[0](torch.randn(5, 4)))
        loss = torchbp.functional.linear_cross_entropy(
            hidden, head.weight, torch.tensor([0, 1, 2, 0, 1]), linear_bias=head.bias
        )
        with pytest.raises(RuntimeError, match=r"parameter 2\.(weight|bias) received a gradient"):
            loss.backward()


@pytest.mark.parametrize("mode", ["norms", "grads", "clip"])
def test_second_backward_after_an_input_only_backward_refused(mode):
    """autograd.grad w.r.t. the input reaches no parameter, so nothing marks its end; the
    training step after it (an adversarial-training pattern) is a second backward and must
    not be summed with it into the norms and p.grad."""
    model = mlp(nn.Tanh())
    x, target = torch.randn(5, 4, requires_grad=True), torch.tensor([0, 1, 2, 0, 1])
    with per_sample_grads(model, mode=mode, max_norm=1.0 if mode == "clip" else None) as ps:
        loss = torchbp.functional.cross_entropy(model(x), target)
        (grad_x,) = torch.autograd.grad(loss, x)
        with pytest.raises(RuntimeError, match="second backward"):
            step(model, x.detach() + grad_x.sign(), target)
    with pytest.raises(RuntimeError, match="nothing was formed"):
        _ = ps.norms
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("mode", ["norms", "grads", "clip"])
def test_reentrant_checkpoint_after_an_input_only_backward_writes_no_grad(mode):
    """An input-only backward through the first layer, then a forward whose head runs in
    a reentrant checkpoint: that checkpoint's inner backward is a backward of its own,
    which used to be formed (writing the head's p.grad) before the outer backward reached
    the first layer and was refused. It is refused at the head, before anything is
    formed, and every p.grad is left as it was."""
    from torch.utils.checkpoint import checkpoint

    model = mlp(nn.Tanh())
    x = torch.randn(5, 4, requires_grad=True)
    with per_sample_grads(model, mode=mode, max_norm=1.0 if mode == "clip" else None) as ps:
        torch.autograd.grad(model[0](x).sum(), x)
        out = checkpoint(model[2:], model[:2](x), use_reentrant=True)
        with pytest.raises(RuntimeError, match=r"second backward.*Linear '2'.*Linear '0'"):
            out.sum().backward()
        assert all(p.grad is None for p in model.parameters())
        assert all(getattr(p, "grad_sample", None) is None for p in model.parameters())
    with pytest.raises(RuntimeError, match="nothing was formed"):
        _ = ps.norms


@pytest.mark.parametrize("split", [False, True])
def test_backward_after_a_refused_one_that_filed_nothing_writes_no_grad(split):
    """A backward refused before it filed anything (an unbatched input), caught, then
    another one: that later backward, plain or through a reentrant checkpoint of the head
    alone (a split no longer checked), was recorded and formed, writing p.grad (only the
    head's for the split) and giving norms of a context that had failed. It is refused at
    its first Linear, before anything is written, and nothing is formed."""
    from torch.utils.checkpoint import checkpoint

    model = mlp(nn.Tanh())
    x = torch.randn(5, 4)
    with per_sample_grads(model) as ps:
        with pytest.raises(ValueError, match="leading sample dim"):
            model(torch.randn(4)).sum().backward()
        out = checkpoint(model[1:], model[0](x), use_reentrant=True) if split else model(x)
        with pytest.raises(RuntimeError, match="refused an earlier backward"):
            out.sum().backward()
        assert all(p.grad is None for p in model.parameters())
    with pytest.raises(RuntimeError, match="nothing was formed"):
        _ = ps.norms


def _stray_backward(model):
    (model[2].bias * 2).sum().backward()


def _autograd_grad_wrt_a_parameter(model):
    torch.autograd.grad((model[2].bias * 2).sum(), model[2].bias)


@pytest.mark.parametrize("refused", [_stray_backward, _autograd_grad_wrt_a_parameter])
def test_backward_after_a_refusal_by_a_parameter_hook_writes_no_grad(refused):
    """A backward refused at a parameter before any Linear filed anything (a gradient from
    another op, torch.autograd.grad w.r.t. a parameter), caught, then a plain step: the
    context had failed ('nothing is formed'), yet that step was recorded and formed,
    writing p.grad and giving norms. It is refused, and nothing is formed."""
    model = mlp(nn.Tanh())
    with per_sample_grads(model) as ps:
        with pytest.raises(RuntimeError, match="per_sample_grads"):
            refused(model)
        with pytest.raises(RuntimeError, match="refused an earlier backward"):
            model(torch.randn(5, 4)).sum().backward()
        assert all(p.grad is None for p in model.parameters())
    with pytest.raises(RuntimeError, match="nothing was formed"):
        _ = ps.norms


def test_backward_after_one_refused_while_forming_the_results_writes_no_grad():
    """A backward refused while the results were formed, at its end (Linear inputs that
    disagree on the sample dim), caught, then the backward of a forward made before it:
    the context had failed, yet that backward was recorded and formed, writing p.grad and
    giving norms. It is refused at its first Linear, and nothing is formed."""
    model = mlp(nn.Tanh())
    with per_sample_grads(model) as ps:
        made_before = model(torch.randn(5, 4)).sum()
        mixed = model(torch.randn(5, 4)).sum() + model(torch.randn(3, 4)).sum()
        with pytest.raises(RuntimeError, match="disagree on the sample dim"):
            mixed.backward()
        with pytest.raises(RuntimeError, match="refused an earlier backward"):
            made_before.backward()
        assert all(p.grad is None for p in model.parameters())
    with pytest.raises(RuntimeError, match="nothing was formed"):
        _ = ps.norms


class _HookError(Exception):
    pass


def _raise_hook_error(grad):
    raise _HookError("raised by a hook on an activation")


@pytest.mark.parametrize("second_reaches", ["every_layer", "the_first_layer_only"])
def test_backward_after_one_cut_short_by_an_error_forms_nothing(second_reaches):
    """A backward cut short by an error from outside the context (a hook on an
    activation) after the head's backward had filed, caught, then the backward of a forward
    made before it: the cut-short backward's head recording was formed with the later
    one's, counting the head twice in p.grad and the norms (or, for a later backward
    reaching other layers only, writing the head's p.grad from the half step). It is
    refused before anything is formed."""
    model = mlp(nn.Tanh())
    x = torch.randn(5, 4)
    with per_sample_grads(model) as ps:
        made_before = model(x).sum()
        hidden = model[:2](x)
        hidden.register_hook(_raise_hook_error)
        with pytest.raises(_HookError):
            model[2](hidden).sum().backward()
        inputs = None if second_reaches == "every_layer" else list(model[0].parameters())
        with pytest.raises(RuntimeError, match="cut short"):
            made_before.backward(inputs=inputs)
        assert all(p.grad is None for p in model.parameters())
    with pytest.raises(RuntimeError, match="nothing was formed"):
        _ = ps.norms


@pytest.mark.parametrize("norms_read_between", [False, True])
def test_step_after_one_cut_short_by_an_error_names_it(norms_read_between):
    """A step (a new forward and backward) after one cut short by an error from outside
    the context, caught: it was refused as a backward after one that 'e.g.
    torch.autograd.grad w.r.t. the input' had passed, advising to open the context after
    such a backward, or (after reading ps.norms) as one after a backward the context had
    refused; it names the earlier backward as cut short."""
    model = mlp(nn.Tanh())
    x = torch.randn(5, 4)
    with per_sample_grads(model) as ps:
        hidden = model[:2](x)
        hidden.register_hook(_raise_hook_error)
        with pytest.raises(_HookError):
            model[2](hidden).sum().backward()
        if norms_read_between:
            with pytest.raises(RuntimeError, match="nothing was formed"):
                _ = ps.norms
        with pytest.raises(RuntimeError, match="cut short") as refusal:
            model(x).sum().backward()
        assert "autograd.grad" not in str(refusal.value)
        assert all(p.grad is None for p in model.parameters())


def _fail_input_grad_of(monkeypatch, layer: nn.Module) -> None:
    """Make ``g @ W``, the input gradient of ``layer``'s Linear backward, run out of memory
    (simulated)."""
    matmul = torch.Tensor.__matmul__

    def out_of_memory_at_the_layer(a, b):
        if (
            isinstance(b, torch.Tensor)
            and b.shape == layer.weight.shape
            and b.data_ptr() == layer.weight.data_ptr()
        ):
            raise torch.OutOfMemoryError("simulated: out of memory for g @ W")
        return matmul(a, b)

    monkeypatch.setattr(torch.Tensor, "__matmul__", out_of_memory_at_the_layer)


def _head_once(model, x):
    return model(x).sum()


def _head_twice(model, x):
    hidden = model[:2](x)
    return (model[2](hidden) + model[2](hidden * 2)).sum()


@pytest.mark.parametrize("forward", [_head_once, _head_twice], ids=["once", "twice"])
def test_backward_after_one_whose_linear_input_gradient_failed_forms_nothing(monkeypatch, forward):
    """A Linear backward that filed its recording and then failed computing ``g @ W``
    (running out of memory), caught, before any parameter was reached (the head's, or
    its second call's when the head is called twice): the recording stayed, and the
    backward of a forward made before it was recorded and formed with it, counting the
    head twice in p.grad and the norms. It is refused before anything is formed."""
    model = mlp(nn.Tanh())
    x = torch.randn(5, 4)
    with per_sample_grads(model) as ps:
        made_before = forward(model, x)
        failing = forward(model, x)
        with monkeypatch.context() as patched:
            _fail_input_grad_of(patched, model[2])
            with pytest.raises(torch.OutOfMemoryError, match="simulated"):
                failing.backward()
        with pytest.raises(RuntimeError, match="cut short"):
            made_before.backward()
        assert all(p.grad is None for p in model.parameters())
    with pytest.raises(RuntimeError, match="nothing was formed"):
        _ = ps.norms


def test_second_step_through_a_whole_model_reentrant_checkpoint_refused_as_such():
    """A second step inside one context, through a reentrant checkpoint holding every
    trainable Linear (which works), is a second backward: it was refused as a backward
    'after the recording had ended, in the same backward', advising use_reentrant=False,
    which would not have helped. The first step's results stay."""
    from torch.utils.checkpoint import checkpoint

    model = mlp(nn.Tanh())
    x = torch.randn(5, 4, requires_grad=True)
    with per_sample_grads(model) as ps:
        checkpoint(model, x, use_reentrant=True).sum().backward()
        grads, norms = [p.grad.clone() for p in model.parameters()], ps.norms.clone()
        out = checkpoint(model, x, use_reentrant=True)
        with pytest.raises(RuntimeError, match="second backward") as refusal:
            out.sum().backward()
    assert "use_reentrant=False" not in str(refusal.value)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    assert torch.equal(ps.norms, norms)


def test_later_backward_reaching_a_call_through_a_reentrant_checkpoint_refused_as_second():
    """After the context's backward, a second one whose reentrant checkpoint reaches, through
    its function's closure, a Linear call made before the first backward: it was refused as
    a backward 'after the recording had ended, in the same backward', advising
    use_reentrant=False, which would not help. It is refused as the second backward it is,
    and the first one's results stay."""
    from torch.utils.checkpoint import checkpoint

    model = mlp(nn.Tanh())
    x, z = torch.randn(5, 4), torch.randn(5, 6, requires_grad=True)
    with per_sample_grads(model) as ps:
        out, h = model(x), model[0](x)
        side = checkpoint(lambda t: t * h, z, use_reentrant=True)
        out.sum().backward()
        grads, norms = [p.grad.clone() for p in model.parameters()], ps.norms.clone()
        with pytest.raises(RuntimeError, match="second backward through Linear '0'") as refusal:
            side.sum().backward()
    assert "use_reentrant=False" not in str(refusal.value)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    assert torch.equal(ps.norms, norms)


def test_backward_after_an_input_only_backward_through_other_layers_refused():
    """A backward after an input-only one is a second backward even when it passes none
    of the layers the first did; it was refused only at a layer both passed, so one
    through other layers was formed as the context's one backward."""
    model = mlp(nn.Tanh())
    x = torch.randn(5, 4, requires_grad=True)
    with per_sample_grads(model) as ps:
        torch.autograd.grad(model[0](x).sum(), x)
        with pytest.raises(RuntimeError, match=r"second backward.*Linear '2'.*Linear '0'"):
            model[2](torch.randn(5, 6)).sum().backward()
    with pytest.raises(RuntimeError, match="nothing was formed"):
        _ = ps.norms
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("mode", ["norms", "grads", "clip"])
def test_backward_with_inputs_sets_only_their_grads(mode):
    """loss.backward(inputs=[...]) accumulates into those parameters only, as autograd
    does; before, the context formed p.grad for every recorded layer."""
    model = mlp(nn.Tanh())
    x, target = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])
    loss = torchbp.functional.cross_entropy(model(x), target)
    loss.backward(inputs=[model[0].weight])
    plain = model[0].weight.grad.clone()
    model.zero_grad(set_to_none=True)
    with per_sample_grads(model, mode=mode, max_norm=1e6 if mode == "clip" else None):
        loss = torchbp.functional.cross_entropy(model(x), target)
        loss.backward(inputs=[model[0].weight])
    torch.testing.assert_close(model[0].weight.grad, plain)
    assert [n for n, p in model.named_parameters() if p.grad is not None] == ["0.weight"]


def test_numpy_scalars_are_numbers():
    """max_norm and the noise multiplier read from a numpy array or config are numbers;
    before, np.float32 was refused as 'not a positive number'."""
    np = pytest.importorskip("numpy")
    model = mlp()
    with per_sample_grads(model, mode="clip", max_norm=np.float32(0.5)) as ps:
        step(model)
        ps.add_noise(np.float32(1.0), generator=torch.Generator().manual_seed(0))
    assert ps.max_norm == 0.5 and all(p.grad is not None for p in model.parameters())


def test_a_backward_that_fails_midway_forms_nothing():
    """An error from elsewhere in the backward (here a gradient check on a hidden layer),
    caught inside the with block: the half-recorded backward gives no norms and no
    p.grad; before, the norms of the layers it had passed were handed out."""

    def check_finite(grad):
        raise FloatingPointError("non-finite gradient")

    model = mlp(nn.Tanh())
    with per_sample_grads(model, mode="clip", max_norm=1.0) as ps:
        hidden = model[1](model[0](torch.randn(5, 4)))
        hidden.register_hook(check_finite)
        with pytest.raises(FloatingPointError):
            model[2](hidden).sum().backward()
        with pytest.raises(RuntimeError, match="nothing was formed"):
            _ = ps.norms
    with pytest.raises(RuntimeError, match="nothing was formed"):
        _ = ps.norms
    assert all(p.grad is None for p in model.parameters())


def test_a_model_recorded_by_a_context_on_another_thread_is_refused():
    """Contexts are found by the weights they record from any thread (the CUDA backward runs
    on autograd's device thread), so two threads cannot record one model at once."""
    import threading

    model = mlp()
    opened, release = threading.Event(), threading.Event()

    def hold_a_context():
        with per_sample_grads(model):
            opened.set()
            release.wait(10)

    thread = threading.Thread(target=hold_a_context)
    thread.start()
    try:
        assert opened.wait(10)
        with pytest.raises(RuntimeError, match="another context, open on another thread"):
            with per_sample_grads(model):
                pass
    finally:
        release.set()
        thread.join()
    with per_sample_grads(model) as ps:  # closed there: free again
        step(model)
    assert ps.norms.shape == (5,)


def _freeze(what):
    return lambda model: model.get_parameter(what).requires_grad_(False)


def _unfreeze(what):
    return lambda model: model.get_parameter(what).requires_grad_(True)


def _model_with_frozen(*names):
    """Linear '0', LayerNorm '1' (frozen), Tanh, Linear '3'; the named ones frozen too."""
    model = mlp(nn.LayerNorm(6), nn.Tanh())
    for name in ("1.weight", "1.bias", *names):
        model.get_parameter(name).requires_grad_(False)
    return model


_TOGGLES = {
    # (parameters frozen when the context is created, the toggle, the parameter named)
    "freeze": ((), _freeze("0.weight"), "0.weight"),
    "unfreeze weight of a tracked layer": (("0.weight",), _unfreeze("0.weight"), "0.weight"),
    "unfreeze a whole layer": (("3.weight", "3.bias"), _unfreeze("3.weight"), "3.weight"),
    "unfreeze a LayerNorm": ((), _unfreeze("1.weight"), "1.weight"),
}


@pytest.mark.parametrize("frozen,toggle,name", _TOGGLES.values(), ids=_TOGGLES.keys())
@pytest.mark.parametrize("when", ["before entering", "inside the context"])
def test_trainability_changed_after_creation_refused_by_name(frozen, toggle, name, when):
    """The context accounts for the parameters trainable when it was created. A parameter
    frozen or unfrozen after that is refused by name, before entering or at the backward;
    before, that failed inside torch ('cannot register a hook on a tensor that doesn't
    require gradient'), inside the recorder ('NoneType' object has no attribute
    'reshape'), with a message blaming a Linear outside the model, or silently: an
    unfrozen weight of a layer with a trainable bias got no p.grad, and an unfrozen
    LayerNorm got its p.grad unclipped and left out of the norms."""
    model = _model_with_frozen(*frozen)
    ps = per_sample_grads(model, mode="clip", max_norm=1.0)
    message = rf"parameter '{name}'.*requires_grad.*since the context was created"
    if when == "before entering":
        toggle(model)
        with pytest.raises(RuntimeError, match=message):
            with ps:
                pass
    else:
        with ps:
            toggle(model)
            with pytest.raises(RuntimeError, match=message):
                step(model)
        with pytest.raises(RuntimeError, match="nothing was formed"):
            _ = ps.norms
    assert getattr(per_sample_recording, "recorder", None) is None


def test_trainability_toggled_back_before_entering_is_fine():
    model = mlp(nn.Tanh())
    ps = per_sample_grads(model, mode="norms")
    model[0].weight.requires_grad_(False)
    model[0].weight.requires_grad_(True)
    with ps:
        step(model)
    assert ps.norms.shape == (5,)


def _train(module):
    module.train()


def _dim_zero(module):
    module.dim = 0


@pytest.mark.parametrize(
    "middle, change, message",
    [
        (lambda: nn.BatchNorm1d(6, affine=False).eval(), _train, r"'1' \(BatchNorm1d\) norm"),
        (lambda: nn.Softmax(dim=1), _dim_zero, r"'1' \(Softmax\) normalises along dim 0"),
    ],
    ids=["BatchNorm switched to train", "softmax dim set to 0"],
)
@pytest.mark.parametrize("when", ["before entering", "inside the context"])
def test_module_made_to_mix_samples_after_creation_refused_at_the_forward(
    middle, change, message, when
):
    """A module checked when the context was created (a BatchNorm in eval mode, a softmax
    along dim 1) that mixes samples by the forward (model.train(), dim = 0) is refused
    there, by name; before, its batch statistics or normalisation over the samples gave
    silently wrong norms, clipping and grad_sample."""
    middle = middle()
    model = mlp(middle)
    ps = per_sample_grads(model, mode="clip", max_norm=1.0)
    if when == "before entering":
        change(middle)
    with pytest.raises(TypeError, match=message):
        with ps:
            if when == "inside the context":
                change(middle)
            step(model)
    assert per_sample_recording.recorder is None


@pytest.mark.parametrize("when", ["before entering", "inside the context"])
def test_parameter_replaced_after_creation_refused_by_name(when):
    """A Linear's weight replaced by a new Parameter after the context was created (e.g.
    load_state_dict(..., assign=True)) is refused by name, on entering or at the
    backward, and the
    context's entries in the registry of recorded weights all go on exit. Before, the
    message blamed a Linear outside the model, and the entry of a weight replaced inside
    the with block was left behind: a later tensor given that weight's id (ids are reused)
    was routed to the closed context, and plain training through it failed."""
    from torchbp.autograd.linear import per_sample_recorders_by_weight

    model = mlp(nn.Tanh())
    ps = per_sample_grads(model, mode="clip", max_norm=1.0)

    def replace():
        model[0].weight = nn.Parameter(model[0].weight.detach().clone())

    message = r"parameter '0.weight' was replaced or removed since the context was created"
    if when == "before entering":
        replace()
        with pytest.raises(RuntimeError, match=message):
            ps.__enter__()
    else:
        with ps:
            replace()
            with pytest.raises(RuntimeError, match=message):
                step(model)
    assert not per_sample_recorders_by_weight
    assert getattr(per_sample_recording, "recorder", None) is None


def test_parameter_added_inside_the_context_refused_by_name():
    """A trainable module added after the context was created got its gradient from
    autograd, unclipped and left out of the norms; refused by name at the backward."""
    model = mlp(nn.Tanh())
    with per_sample_grads(model, mode="clip", max_norm=1.0) as ps:
        model.append(nn.LayerNorm(3))
        with pytest.raises(RuntimeError, match=r"parameter '3.weight' was added since"):
            step(model)
    with pytest.raises(RuntimeError, match="nothing was formed"):
        _ = ps.norms


def test_forward_before_entering_named_at_the_backward():
    """A loss computed before entering the context, backpropagated inside it: the Linear
    calls were not recorded, and the message says so; before, it only asked whether the
    parameter was tied, passed to a functional op or compiled."""
    model = mlp(nn.Tanh())
    loss = model(torch.randn(5, 4)).sum()
    with per_sample_grads(model, mode="clip", max_norm=1.0) as ps:
        with pytest.raises(RuntimeError, match=r"forward run before the context was entered"):
            loss.backward()
    with pytest.raises(RuntimeError, match="nothing was formed"):
        _ = ps.norms


class LoRALinear(torchbp.nn.Linear):
    """A torchbp Linear subclass with its own trainable low-rank adapter (frozen weight)."""

    def __init__(self, features: int, rank: int = 2):
        super().__init__(features, features)
        self.weight.requires_grad_(False)
        self.lora_a = nn.Parameter(torch.randn(rank, features) * 0.1)
        self.lora_b = nn.Parameter(torch.randn(features, rank) * 0.1)

    def forward(self, x):
        return super().forward(x) + (x @ self.lora_a.t()) @ self.lora_b.t()


def test_linear_subclass_with_other_trainable_parameters_refused():
    """A torchbp Linear subclass's own parameters (a LoRA adapter) reach the loss outside
    the recorded Linear call; before, only weight and bias were looked at, and the
    adapter's p.grad came from autograd, unclipped and left out of the norms (a silent
    DP-SGD violation). Refused before the forward, by name; frozen, they are fine."""
    model = mlp(LoRALinear(6))
    with pytest.raises(TypeError, match=r"'1' \(LoRALinear\) has trainable parameters \(lora_a"):
        per_sample_grads(model, mode="clip", max_norm=1e-3)
    model[1].lora_a.requires_grad_(False)
    model[1].lora_b.requires_grad_(False)
    with per_sample_grads(model, mode="clip", max_norm=1e-3) as ps:
        step(model)
    assert ps.norms.shape == (5,)


def test_context_freed_without_the_garbage_collector():
    """A finished context is freed as soon as its last reference goes (no reference cycle
    waits for the garbage collector with the step's results): one is made per step."""
    import gc
    import weakref

    model = mlp(nn.Tanh())
    gc.disable()
    try:
        with per_sample_grads(model, mode="clip", max_norm=1.0) as ps:
            step(model)
        freed = weakref.ref(ps)
        del ps
        assert freed() is None
    finally:
        gc.enable()


class SharedPositions(nn.Module):
    """A trainable projection of a positional table shared by every sample (batch 1)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.table = nn.Parameter(torch.randn(1, 3, 4), requires_grad=False)
        self.positions = torchbp.nn.Linear(4, 4)
        self.body = torchbp.nn.Linear(4, 2)

    def forward(self, x):
        return self.body(x + self.positions(self.table))


def test_inconsistent_sample_dims_name_the_layers():
    """The refusal of a Linear whose input has another sample dim names the layers and
    the size each saw; before, it gave the sizes only, and in a model with many Linear
    layers the one fed a (1, T, d) table shared by the samples was left to be found."""
    model = SharedPositions()
    with per_sample_grads(model):
        with pytest.raises(
            RuntimeError, match=r"sizes \[1, 5\]\): 1 at Linear 'positions'; 5 at Linear 'body'"
        ):
            model(torch.randn(5, 3, 4)).sum().backward()


def test_autocast_refusal_names_the_linear():
    """Autocast hands the Linear a bfloat16 copy of its weight, which the context cannot
    attribute: the refusal names the Linear that ran under autocast. Before, it named no
    module and only listed autocast among three possible causes."""
    model = mlp(nn.Tanh())
    with per_sample_grads(model) as ps:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(torch.randn(5, 4))
        with pytest.raises(
            RuntimeError, match=r"Linear '2' ran under autocast.*cast by autocast to torch.bfloat16"
        ):
            out.float().sum().backward()
    with pytest.raises(RuntimeError, match="nothing was formed"):
        _ = ps.norms


def test_model_weight_with_another_bias_refusal_names_the_linear():
    """A model Linear's weight passed to a functional linear with another bias (here none):
    the refusal names that Linear. Before, it called the weight one of a Linear outside
    the model."""
    model = mlp(nn.Tanh())
    x = torch.randn(5, 4)
    with per_sample_grads(model):
        loss = model(x).sum() + torchbp.functional.linear(x, model[0].weight).sum()
        with pytest.raises(
            RuntimeError, match=r"the weight of Linear '0' was passed to a linear call with "
        ):
            loss.backward()


@pytest.mark.parametrize("segment", ["first", "middle", "last"])
def test_reentrant_checkpoint_of_some_trainable_layers_refused_by_name(segment):
    """A reentrant checkpoint runs a backward of its own through its segment; with
    trainable layers outside it, the first of the two backwards to pass its layers ends the
    recording and the other's layers are refused, naming the checkpoint and saying to use
    use_reentrant=False. Before, the one backward was called a second one ('open a new
    one per step'), and the docstring said that a segment starting the model works."""
    from torch.utils.checkpoint import checkpoint

    model = mlp(nn.Tanh(), torchbp.nn.Linear(6, 6), nn.Tanh())
    x = torch.randn(5, 4, requires_grad=True)

    def forward(x):
        if segment == "first":
            return model[3:](checkpoint(model[:3], x, use_reentrant=True))
        if segment == "last":
            return checkpoint(model[2:], model[:2](x), use_reentrant=True)
        return model[3:](checkpoint(model[2:3], model[:2](x), use_reentrant=True))

    with per_sample_grads(model):
        out = forward(x)
        with pytest.raises(
            RuntimeError,
            match=r"split across reentrant .*Linear '(0|2)'.*use_reentrant=False",
        ):
            out.sum().backward()


@pytest.mark.parametrize("frozen", ["none", "weight"])
def test_complex_linear_refused_by_name(frozen):
    """A complex Linear's gradient is gᵀ conj(x) (torchbp's Linear, as native); the
    per-sample formulas are real ones: its p.grad came out wrong in every mode (no conj),
    the norms complex, and clip mode failed inside torch ('clamp is not supported for
    complex types'). Such a layer is refused before the forward, by name."""
    model = nn.Sequential(torchbp.nn.Linear(4, 3, dtype=torch.complex64))
    if frozen == "weight":
        model[0].weight.requires_grad_(False)  # a complex bias alone
    with pytest.raises(TypeError, match=r"'0' \(Linear\) has complex trainable parameters"):
        per_sample_grads(model)


def test_errors_from_autograd_grad_after_the_backward_keep_their_message():
    """An error raised inside a later torch.autograd.grad call (a saliency map of the
    input after the step, refused as a second backward; or torch's own complaint about an
    unrelated tensor) leaves the with block as it is. Before, every such error was replaced
    on leaving by 'torch.autograd.grad with respect to the model's parameters is not
    supported', which the call was not."""
    model = mlp(nn.Tanh())
    x = torch.randn(5, 4, requires_grad=True)
    with pytest.raises(RuntimeError, match="a second backward through Linear '2'"):
        with per_sample_grads(model):
            loss = model(x).sum()
            loss.backward(retain_graph=True)
            torch.autograd.grad(loss, x)
    with pytest.raises(RuntimeError, match="appears to not have been used in the graph"):
        with per_sample_grads(model):
            model(x).sum().backward()
            y, unused = torch.randn(3, requires_grad=True), torch.randn(2, requires_grad=True)
            torch.autograd.grad(y.sum(), [y, unused])


class _CallsByKeyword(nn.Module):
    """Calls its Linear, then ``module(input=...)``: the input reaches the module's
    forward pre-hooks as a keyword, not in ``args``."""

    def __init__(self, module):
        super().__init__()
        self.linear = torchbp.nn.Linear(4, 4)
        self.module = module

    def forward(self, x):
        return self.module(input=self.linear(x))


@pytest.mark.parametrize(
    "module, message, error",
    [
        (nn.Softmax(), r"'module' \(Softmax\) with dim=None acts along dim 0", ValueError),
        (nn.Flatten(-3), r"'module' \(Flatten\) with start_dim=-3", ValueError),
        (nn.BatchNorm1d(2, affine=False).eval(), r"'module' \(BatchNorm1d\) norm", TypeError),
    ],
    ids=["softmax dim=None", "flatten start_dim=-3", "BatchNorm switched to train"],
)
def test_module_called_with_a_keyword_input_still_refused_at_the_forward(module, message, error):
    """The forward check of a module that picks its dim from the input (or was made to
    mix samples after the context was created) also sees an input passed as a keyword,
    ``softmax(input=x)``; before, it looked at the positional arguments only, let the
    call through, and the norms came out silently wrong (samples mixed)."""
    model = _CallsByKeyword(module)
    ps = per_sample_grads(model)
    module.train()
    with pytest.raises(error, match=message):
        with ps:
            model(torch.randn(5, 2, 4)).sum().backward()
    assert per_sample_recording.recorder is None


class _CosineHead(nn.Module):
    """A Linear, then the cosine similarity of its output to a fixed direction."""

    def __init__(self, similarity: nn.CosineSimilarity):
        super().__init__()
        self.linear = torchbp.nn.Linear(4, 3)
        self.similarity = similarity

    def forward(self, x):
        return self.similarity(self.linear(x), torch.ones(3))


@pytest.mark.parametrize(
    "dim, error, message",
    [
        (0, TypeError, r"'similarity' \(CosineSimilarity\) reduces along dim 0, the sample"),
        (-2, ValueError, r"'similarity' \(CosineSimilarity\) with dim=-2 acts along dim 0"),
    ],
)
def test_modules_that_mix_along_dim_0_other_than_softmax_refused(dim, error, message):
    """GLU and CosineSimilarity act along ``dim`` as softmax does: along dim 0 (given, or
    a negative dim that lands there) GLU gates each sample by another and CosineSimilarity
    reduces over the samples. Refused by name (before the forward when dim is 0, else at
    the forward); before, they passed as parameter-free modules trusted to act per
    sample, and the norms and clipping came out silently wrong."""
    model = _CosineHead(nn.CosineSimilarity(dim=dim))
    with pytest.raises(error, match=message):
        with per_sample_grads(model):
            model(torch.randn(5, 4)).sum().backward()
    assert per_sample_recording.recorder is None
    model.similarity.dim = 1  # along the features: per sample
    with per_sample_grads(model) as ps:
        model(torch.randn(5, 4)).sum().backward()
    assert ps.norms.shape == (5,)


def test_add_noise_twice_refused_and_grads_kept():
    """DP-SGD adds the Gaussian noise once per step: a second ps.add_noise added a second
    draw, so p.grad carried noise of std σC·√2 while the accountant was told σ (a silent
    loss of utility; and a caller that meant the second call to replace the first would
    get neither). The second call is refused, naming the first, and p.grad keeps the
    once-noised value."""
    model = mlp()
    with per_sample_grads(model, mode="clip", max_norm=1.0) as ps:
        step(model)
        ps.add_noise(1.0, generator=torch.Generator().manual_seed(0))
    noised = [p.grad.clone() for p in ps.parameters]
    with pytest.raises(RuntimeError, match="add_noise was already called"):
        ps.add_noise(1.0)
    assert all(torch.equal(p.grad, g) for p, g in zip(ps.parameters, noised))


def _reentrant_split_forward(model, x, split):
    """The model run with trainable Linear layers split across reentrant checkpoint
    segments, or between one and the rest of the model."""
    from torch.utils.checkpoint import checkpoint

    def segment(module, h):
        return checkpoint(module, h, use_reentrant=True)

    if split == "first":
        return model[3:](segment(model[:3], x))
    if split == "middle":
        return model[3:](segment(model[2:3], model[:2](x)))
    if split == "last":
        return segment(model[2:], model[:2](x))
    if split == "two_segments":
        return segment(model[2:], segment(model[:2], x))
    if split == "called_twice":
        return segment(model, x) + segment(model, x.flip(0))
    # "nested": Linear '0' in the outer segment, the rest in one inside it
    return segment(lambda h: segment(model[2:], model[:2](h)), x)


@pytest.mark.parametrize(
    "split", ["first", "middle", "last", "two_segments", "called_twice", "nested"]
)
@pytest.mark.parametrize("mode", ["norms", "clip", "grads"])
def test_reentrant_checkpoint_split_refused_before_any_grad_is_written(split, mode):
    """Trainable Linear layers split across reentrant checkpoint segments (or between one
    and the rest of the model) run in two backwards; the first of them to pass its layers
    formed and wrote their p.grad (and, in grads mode, p.grad_sample) before the other
    backward was refused: the caller who caught the error kept half a step's gradients
    added to p.grad. The split is refused now at the first Linear backward, before any
    gradient is written: every p.grad is bit-identical to before."""
    model = mlp(nn.Tanh(), torchbp.nn.Linear(6, 6), nn.Tanh())
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    before = [p.grad.clone() for p in model.parameters()]
    x = torch.randn(5, 4, requires_grad=True)
    max_norm = 0.5 if mode == "clip" else None
    with per_sample_grads(model, mode, max_norm) as ps:
        out = _reentrant_split_forward(model, x, split)
        with pytest.raises(RuntimeError, match=r"reentrant .*use_reentrant=False"):
            out.sum().backward()
    for (name, p), old in zip(model.named_parameters(), before):
        assert torch.equal(p.grad, old), f"{name}'s p.grad changed"
        assert getattr(p, "grad_sample", None) is None, f"{name}.grad_sample was set"
    with pytest.raises(RuntimeError, match="nothing was formed"):
        _ = ps.norms


@pytest.mark.parametrize("stray", ["linear_before_the_model", "functional_call_first_layer"])
@pytest.mark.parametrize("mode", ["norms", "clip", "grads"])
def test_stray_linear_backward_after_the_models_refused_before_any_grad_is_written(stray, mode):
    """A torchbp Linear call the context cannot record (a trainable Linear outside the
    model, in front of it; torch.func.functional_call with new parameters for the first
    layer) whose backward runs after the backward has passed every model parameter:
    the multi-gradient hook fired first, forming and writing p.grad (and p.grad_sample),
    and only then was the call refused, so a caller who caught the error kept the
    half-step's gradients. The results now wait for the stray call's backward, which
    refuses it before anything is written: every p.grad is bit-identical."""
    from torch.func import functional_call

    model = mlp(nn.Tanh(), torchbp.nn.Linear(6, 6), nn.Tanh())
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    before = [p.grad.clone() for p in model.parameters()]
    x = torch.randn(5, 4)
    front = torchbp.nn.Linear(4, 4)
    first = {
        "0.weight": model[0].weight.detach().clone().requires_grad_(),
        "0.bias": model[0].bias.detach().clone().requires_grad_(),
    }
    max_norm = 0.5 if mode == "clip" else None
    # (in clip mode a trainable Linear in front of the model is refused sooner, at the
    # model's forward: see tests/per_sample/test_parameters_outside_the_model.py)
    refused_at_the_forward = mode == "clip" and stray == "linear_before_the_model"
    message = "not one of the model's" if refused_at_the_forward else "contribution cannot be"
    with per_sample_grads(model, mode, max_norm) as ps:
        with pytest.raises(RuntimeError, match=message):
            out = (
                model(front(x))
                if stray == "linear_before_the_model"
                else functional_call(model, first, (x,))
            )
            out.sum().backward()
    for (name, p), old in zip(model.named_parameters(), before):
        assert torch.equal(p.grad, old), f"{name}'s p.grad changed"
        assert getattr(p, "grad_sample", None) is None, f"{name}.grad_sample was set"
    unformed = "no backward .* was recorded" if refused_at_the_forward else "nothing was formed"
    with pytest.raises(RuntimeError, match=unformed):
        _ = ps.norms


@pytest.mark.parametrize("transform", ["grad", "vmap_grad"])
def test_torch_func_transform_inside_the_context_refused_by_name(transform):
    """torch.func.grad (or vmap of it) of a functional_call inside the context: its linear
    calls carry the transform's own parameters, not the model's, and are refused at their
    backward with the context's message (not an AttributeError from registering hooks on
    the graph from inside the transform)."""
    from torch.func import functional_call, grad, vmap

    model = mlp(nn.Tanh())
    x = torch.randn(5, 4)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, xs):
        return functional_call(model, p, (xs,)).sum()

    with per_sample_grads(model):
        with pytest.raises(RuntimeError, match="its per-sample contribution cannot be"):
            if transform == "grad":
                grad(loss)(params, x)
            else:
                vmap(grad(loss), in_dims=(None, 0))(params, x[:, None])


@pytest.mark.parametrize("call", ["vmap_model", "vmap_rows_of_one"])
def test_vmap_of_the_model_inside_the_context_refused_naming_the_transform(call):
    """torch.func.vmap of the model inside the context: its Linear calls see batched
    tensors standing for others (an input of shape (6,) for a (5, 6) batch), and the
    context either refused it as a missing sample dim or filed the batched tensors,
    which escaped the transform and crashed in forming the norms with torch's "tensor
    may have escaped" error. Refused at the backward, naming the transform, before any
    gradient is written; an evaluation under vmap (no backward) still runs."""
    from torch.func import vmap

    model, x = mlp(nn.Tanh()), torch.randn(5, 4)
    with per_sample_grads(model, "clip", max_norm=1.0) as ps:
        with torch.no_grad():
            assert vmap(model)(x).shape == (5, 3)
        out = vmap(model)(x) if call == "vmap_model" else vmap(lambda r: model(r[None])[0])(x)
        with pytest.raises(RuntimeError, match=r"Linear '2' ran inside a torch.func transform"):
            out.sum().backward()
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(RuntimeError, match="nothing was formed"):
        _ = ps.norms


@pytest.mark.parametrize("mode", ["norms", "grads"])
def test_vmap_of_a_trainable_linear_in_front_of_the_model_writes_no_grad(mode):
    """vmap of a trainable torchbp Linear outside the model, in front of it: its call is
    refused at its backward, which runs after the model's Linears (made later). The
    refusal of a call inside a transform no longer made the results wait for that
    backward, so the model's p.grad was written before it raised; it waits again."""
    from torch.func import vmap

    model, front, x = mlp(nn.Tanh()), torchbp.nn.Linear(4, 4), torch.randn(5, 4)
    with per_sample_grads(model, mode) as ps:
        h = vmap(front)(x)
        with pytest.raises(RuntimeError, match="ran inside a torch.func transform"):
            model(h).sum().backward()
    assert all(p.grad is None for p in [*model.parameters(), *front.parameters()])
    with pytest.raises(RuntimeError, match="nothing was formed"):
        _ = ps.norms


def test_functional_call_refusal_names_the_swapped_parameter():
    """torch.func.functional_call with other tensors than the model's parameters is
    refused at the backward. The message asked whether the Linear's forward transforms
    its weight, which points its user to the wrong place: it now says the Linear ran
    with its parameter swapped for another tensor, as functional_call does, and that the
    context records the model's own parameters."""
    from torch.func import functional_call

    model = mlp(nn.Tanh())
    params = {k: v.detach().clone().requires_grad_() for k, v in model.named_parameters()}
    with per_sample_grads(model):
        out = functional_call(model, params, (torch.randn(5, 4),))
        with pytest.raises(
            RuntimeError,
            match=r"Linear '2' ran with its weight swapped for another tensor of shape "
            r"\(3, 6\) \(as torch.func.functional_call does.*own parameters",
        ):
            out.sum().backward()


def test_numbers_beyond_the_float_range_are_value_errors():
    """A Python int too large for a float (10**400) as max_norm or noise_multiplier
    escaped as an OverflowError from math.isfinite; it is a ValueError naming the
    argument, like inf."""
    with pytest.raises(ValueError, match="max_norm must be positive and finite"):
        per_sample_grads(mlp(), "clip", 10**400)
    model = mlp()
    with per_sample_grads(model, mode="clip", max_norm=1.0) as ps:
        step(model)
    with pytest.raises(ValueError, match="noise_multiplier must be finite and >= 0"):
        ps.add_noise(10**400)


@pytest.mark.parametrize(
    ("dtype", "max_norm", "sigma"),
    [(torch.float32, 1e20, 1e20), (torch.float64, 1e200, 1e200), (torch.bfloat16, 1e30, 1e10)],
)
def test_noise_std_beyond_the_gradient_dtype_refused_before_any_change(dtype, max_norm, sigma):
    """σ·C past the largest number of the gradients' dtype (or past a float's, inf): the
    float32 step failed inside torch ('value cannot be converted to type float without
    overflow') after p.grad of an unreached parameter had been set to zeros, and the
    float64 one silently made every gradient ±inf. Refused now, before any change."""
    model = mlp(nn.Tanh(), torchbp.nn.Linear(6, 6)).to(dtype)
    with per_sample_grads(model, mode="clip", max_norm=max_norm) as ps:
        out = model(torch.randn(5, 4, dtype=dtype))
        out.sum().backward(inputs=[model[2].weight, model[3].weight])
        before = {name: p.grad for name, p in model.named_parameters()}
        copies = {name: g.clone() for name, g in before.items() if g is not None}
        with pytest.raises(ValueError, match=r"noise_multiplier \* max_norm"):
            ps.add_noise(sigma)
    for name, p in model.named_parameters():
        assert p.grad is before[name], f"{name}'s p.grad was replaced"
        if p.grad is not None:
            assert torch.equal(p.grad, copies[name]), f"{name}'s p.grad changed"


def _grads_after_refused_noise(model, device, generator, error, message):
    """Run a clip step reaching two of the model's layers, call add_noise with
    ``generator``, expect ``error`` matching ``message``, and check no p.grad changed."""
    with per_sample_grads(model, mode="clip", max_norm=1.0) as ps:
        out = model(torch.randn(5, 4, device=device))
        out.sum().backward(inputs=[model[2].weight, model[3].weight])
        before = {name: p.grad for name, p in model.named_parameters()}
        copies = {name: g.clone() for name, g in before.items() if g is not None}
        with pytest.raises(error, match=message):
            ps.add_noise(1.0, generator=generator)
    for name, p in model.named_parameters():
        assert p.grad is before[name], f"{name}'s p.grad was replaced"
        if p.grad is not None:
            assert torch.equal(p.grad, copies[name]), f"{name}'s p.grad changed"


@pytest.mark.parametrize("generator", [0, "seed", torch.manual_seed])
def test_add_noise_generator_not_a_generator_refused_before_any_change(generator):
    """A seed or anything else given as the generator failed inside torch.randn (its
    argument-list dump) after p.grad of the unreached parameters had been set to zeros;
    it is a TypeError naming the argument now, before any change."""
    model = mlp(nn.Tanh(), torchbp.nn.Linear(6, 6))
    _grads_after_refused_noise(model, "cpu", generator, TypeError, "generator must be")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_add_noise_generator_of_another_device_refused_before_any_change():
    """A CPU generator for a CUDA model failed inside torch.randn after p.grad of the
    unreached parameters had been set to zeros (for a model across devices, after the
    noise of the first device's parameters had been added); refused now, naming both
    devices, before any change."""
    model = mlp(nn.Tanh(), torchbp.nn.Linear(6, 6)).cuda()
    _grads_after_refused_noise(model, "cuda", torch.Generator(), ValueError, "generator is on")


def test_out_of_memory_while_forming_leaves_every_gradient_as_it_was(monkeypatch):
    """Running out of memory for the per-sample gradients of one layer (mode='grads'
    materialises B×|θ|) left p.grad of the layers formed before it with this batch
    added (and their p.grad_sample set), although nothing was formed: a caller that
    caught the error and retried with smaller batches added their gradients twice.
    Now the results are written only once every layer's are formed."""
    from torchbp.per_sample import memory

    model = mlp(nn.Tanh())
    before = {name: torch.randn_like(p) for name, p in model.named_parameters()}
    for name, p in model.named_parameters():
        p.grad = before[name].clone()
    allocate, calls = memory.empty, []

    def out_of_memory_at_the_second_layer(shape, like):
        calls.append(shape)
        if len(calls) == 2:
            raise torch.OutOfMemoryError("simulated: out of memory")
        return allocate(shape, like)

    monkeypatch.setattr(memory, "empty", out_of_memory_at_the_second_layer)
    with per_sample_grads(model, mode="grads") as ps:
        with pytest.raises(torch.OutOfMemoryError, match="simulated"):
            step(model)
    assert len(calls) == 2
    for name, p in model.named_parameters():
        assert torch.equal(p.grad, before[name]), f"{name}'s p.grad changed"
        assert getattr(p, "grad_sample", None) is None, f"{name} got a p.grad_sample"
    with pytest.raises(RuntimeError, match="nothing was formed"):
        _ = ps.norms


def test_add_noise_failed_midway_refuses_a_second_draw(monkeypatch):
    """An error while drawing the noise (out of memory for one parameter's draw) left the
    parameters drawn before it noised; a retry of add_noise, which the caller's
    except clause invites, added a second draw to them (std σC·√2, as for a second
    call). The retry is refused now, naming the partly noised gradients."""
    model = mlp(nn.Tanh())
    with per_sample_grads(model, mode="clip", max_norm=1.0) as ps:
        step(model)
        draw, calls = torch.randn, []

        def out_of_memory_at_the_second_draw(*args, **kwargs):
            calls.append(args)
            if len(calls) == 2:
                raise torch.OutOfMemoryError("simulated: out of memory")
            return draw(*args, **kwargs)

        monkeypatch.setattr(torch, "randn", out_of_memory_at_the_second_draw)
        with pytest.raises(torch.OutOfMemoryError, match="simulated"):
            ps.add_noise(1.0)
        monkeypatch.setattr(torch, "randn", draw)
        noised = [p.grad.clone() for p in ps.parameters]
        with pytest.raises(RuntimeError, match="partly noised"):
            ps.add_noise(1.0)
    assert all(torch.equal(p.grad, g) for p, g in zip(ps.parameters, noised))


def _sparse_grad(p):
    p.grad = torch.ones_like(p).to_sparse()


def _expanded_grad(p):
    p.grad = torch.zeros(()).expand(p.shape)


def _inference_grad(p):
    with torch.inference_mode():
        p.grad = torch.zeros_like(p)


@pytest.mark.parametrize("mode", ["norms", "clip"])
def test_sparse_existing_grad_accumulated_as_autograd_does(mode):
    """A sparse p.grad already there (from an embedding-like update, or set by the user)
    failed as the context added to it in place ('add(sparse, dense) is not supported'),
    after the p.grad of the layers formed before it had been written; autograd gives
    the dense sum, and so does the context now."""
    model, plain = mlp(nn.Tanh()), mlp(nn.Tanh())
    for m in (model, plain):
        _sparse_grad(m[0].weight)
        _sparse_grad(m[0].bias)
    x = torch.randn(5, 4)
    with per_sample_grads(model, mode=mode, max_norm=1e6 if mode == "clip" else None):
        step(model, x)
    step(plain, x)
    for (name, p), ref in zip(model.named_parameters(), plain.parameters()):
        assert p.grad.layout == torch.strided, name
        torch.testing.assert_close(p.grad, ref.grad, msg=name)


@pytest.mark.parametrize(
    ("unwritable", "message"),
    [(_expanded_grad, "expanded"), (_inference_grad, "inference")],
)
def test_existing_grad_that_cannot_be_added_to_refused_before_any_write(unwritable, message):
    """An existing p.grad that an in-place add refuses (an expanded tensor, an inference
    tensor; autograd fails on it too) failed midway through the writes, with the
    p.grad of the layers written before it already holding this batch: a caller that
    fixed the gradient and retried added those twice. It is now refused, naming the
    parameter, before any p.grad is written."""
    model = mlp(nn.Tanh())
    unwritable(model[0].weight)
    model[2].weight.grad = torch.ones_like(model[2].weight)
    with per_sample_grads(model) as ps:
        with pytest.raises(RuntimeError, match=rf"parameter 0\.weight.*{message}"):
            step(model)
    assert torch.equal(model[2].weight.grad, torch.ones_like(model[2].weight))
    assert model[2].bias.grad is None and model[0].bias.grad is None
    with pytest.raises(RuntimeError, match="nothing was formed"):
        _ = ps.norms


@pytest.mark.parametrize(
    ("unwritable", "message"),
    [(_sparse_grad, "sparse"), (_expanded_grad, "expanded"), (_inference_grad, "inference")],
)
def test_add_noise_refuses_a_grad_it_cannot_add_to_before_any_change(unwritable, message):
    """add_noise adds the noise to p.grad in place: an unreached parameter's p.grad that
    refuses that (sparse, expanded, an inference tensor) failed midway, after the noise of
    the parameters before it was added. It is refused first now, naming the parameter."""
    model = mlp(nn.Tanh())
    unwritable(model[2].bias)  # the last parameter drawn for
    with per_sample_grads(model, mode="clip", max_norm=1.0) as ps:
        out = model(torch.randn(5, 4))
        out.sum().backward(inputs=[model[2].weight])
        before = {name: p.grad for name, p in model.named_parameters()}
        copies = {name: g.clone() for name, g in before.items() if g is not None}
        with pytest.raises(RuntimeError, match=rf"parameter 2\.bias.*{message}"):
            ps.add_noise(1.0)
        ps_grads = {name: p.grad for name, p in model.named_parameters()}
    for name in before:
        assert ps_grads[name] is before[name], f"{name}'s p.grad was replaced"
        if before[name] is not None:
            same = torch.equal(before[name].to_dense(), copies[name].to_dense())
            assert same, f"{name}'s p.grad changed"


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_frozen_hook_based_spectral_norm_named_in_the_refusal():
    """torch.nn.utils.spectral_norm (hook-based) sets a new weight at every forward, from
    weight_orig: frozen, with a trainable bias, the Linear's calls cannot be matched to the
    layer, and the refusal blamed torch.func.functional_call alone; it names such hooks."""
    model = mlp()
    nn.utils.spectral_norm(model[0])
    model[0].weight_orig.requires_grad_(False)
    with pytest.raises(RuntimeError, match=r"Linear '0' ran with its weight swapped.*spectral_n"):
        with per_sample_grads(model, mode="clip", max_norm=1.0):
            model(torch.randn(5, 4)).sum().backward()
    assert model[0].bias.grad is None


@pytest.mark.parametrize("what", ["bias"])
def test_frozen_parametrization_refused_at_creation_by_name(what):
    """A Linear whose bias is parametrized (torch.nn.utils.parametrize) gets a new tensor
    at every forward, so none of its calls can be matched to the layer. Frozen, with the
    weight trainable, it was refused at the backward, after the forward (a private fit
    had started its step), as a weight 'passed to a linear call with a bias other than
    its own'. Now refused at creation, naming the parametrization, with the way out (a
    trainable one is refused by name as its parametrization's parameter; a frozen
    parametrized weight with a trainable bias is served: see
    tests/per_sample/test_parametrized_weight.py)."""
    from torch.nn.utils import parametrize

    class Doubled(nn.Module):
        def forward(self, w):
            return 2 * w

    model = mlp()
    parametrize.register_parametrization(model[0], what, Doubled())
    getattr(model[0].parametrizations, what).original.requires_grad_(False)
    with pytest.raises(
        TypeError, match=rf"'0' \(ParametrizedLinear\) has a parametrized {what} .*remove_param"
    ):
        per_sample_grads(model, mode="clip", max_norm=1.0)
