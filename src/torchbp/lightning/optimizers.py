"""ERMClassifier's optimizer and LR scheduler factories: kept in checkpoints as class paths
(and made again from them), an optimizer that owns its tensor hyperparameters, and the trial
steps that find a scheduler's bad arguments before a fit."""

from __future__ import annotations

import functools
import importlib
import traceback
import warnings
from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch

__all__ = [
    "SCHEDULER_TRIAL_EPOCHS",
    "check_optimizer_arguments",
    "check_scheduler_fits_trainer",
    "factory_as_config",
    "factory_from_config",
    "owning_its_hyperparameters",
]

_PLAIN = (bool, int, float, str, type(None))


def _plain(value: Any) -> bool:
    """Whether ``value`` is a number, string, None or a list/tuple of them (what
    ``torch.load(weights_only=True)`` reads back)."""
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    return isinstance(value, _PLAIN)


def factory_as_config(factory: Any) -> Any:
    """An optimizer or scheduler factory as the hyperparameter a checkpoint keeps:
    a class, or a ``functools.partial`` of one with plain keyword arguments, becomes
    ``{"class_path": ..., "init_args": {...}}`` (the form torchbp-train saves), so the
    checkpoint loads with ``torch.load(weights_only=True)``, PyTorch's default; anything
    else (a lambda, a partial holding tensors) is kept as given and needs
    ``weights_only=False`` to load."""
    func, kwargs = factory, {}
    if isinstance(factory, functools.partial) and not factory.args:
        func, kwargs = factory.func, dict(factory.keywords)
    if isinstance(func, type) and "<" not in func.__qualname__ and _plain(list(kwargs.values())):
        return {"class_path": f"{func.__module__}.{func.__qualname__}", "init_args": kwargs}
    return factory


def factory_from_config(factory: Any, name: str) -> Any:
    """The factory a :func:`factory_as_config` dict stands for (a checkpoint's
    hyperparameter): ``partial(class, **init_args)``; anything else as given."""
    if not (isinstance(factory, dict) and "class_path" in factory):
        return factory
    module, _, qualname = factory["class_path"].rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), qualname)
    except (ImportError, AttributeError, ValueError) as e:
        raise ValueError(f"{name}: cannot import {factory['class_path']!r}: {e}") from e
    return functools.partial(cls, **factory.get("init_args", {}))


def _copied_tensors(value: Any) -> Any:
    """``value`` with each tensor in it (itself, or in a tuple or list) replaced by a copy."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if type(value) in (tuple, list):  # betas=(tensor, tensor); not a namedtuple's fields
        return type(value)(_copied_tensors(v) for v in value)
    return value


def owning_its_hyperparameters(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """``optimizer`` with copies of its tensor hyperparameters (``lr``, ``betas``, ...) in its
    defaults and parameter groups: the tensors its factory was given, which a scheduler would
    step in place (``fill_``), stay as they were."""
    for settings in (optimizer.defaults, *optimizer.param_groups):
        for key, value in settings.items():
            if key != "params":
                settings[key] = _copied_tensors(value)
    return optimizer


#: the most epochs :meth:`ERMClassifier.check_scheduler` steps a scheduler's copy through
SCHEDULER_TRIAL_EPOCHS = 100_000


def _epochs_of_the_fit(trainer: pl.Trainer) -> int:
    """The epochs ``trainer`` will fit if nothing stops it earlier: ``max_epochs`` (at most
    :data:`SCHEDULER_TRIAL_EPOCHS`), or 0 when ``max_steps`` or ``max_time`` may end it first
    (or it has no end)."""
    epochs = trainer.max_epochs
    if epochs is None or epochs < 1 or trainer.max_steps not in (None, -1):
        return 0
    if any(isinstance(c, pl.callbacks.Timer) for c in trainer.callbacks):  # max_time
        return 0
    return min(epochs, SCHEDULER_TRIAL_EPOCHS)


def _scheduler_name(factory: Any, error: BaseException) -> str:
    """The name of the scheduler class ``factory`` makes: the class, or a ``partial``'s;
    else (a wrapper, as torchbp-train's) the scheduler that ``error`` was raised making."""
    made = getattr(factory, "func", factory)
    if isinstance(made, type):
        return made.__name__
    being_made = [
        type(frame.f_locals["self"]).__name__
        for frame, _ in traceback.walk_tb(error.__traceback__)
        if isinstance(frame.f_locals.get("self"), torch.optim.lr_scheduler.LRScheduler)
    ]
    return being_made[-1] if being_made else "the scheduler"


def _first_failing_step(
    scheduler: torch.optim.lr_scheduler.LRScheduler, steps: int
) -> tuple[int, str] | None:
    """Step ``scheduler`` (of a throwaway optimizer) ``steps`` times: the step that raised
    (counted from 1) and why, or ``None``. Some arguments fail only here
    (``StepLR(step_size=0)``: a ZeroDivisionError; ``OneCycleLR`` beyond its
    ``total_steps``: a ValueError). ReduceLROnPlateau, which steps on a metric (and checks
    its arguments when made), is not stepped."""
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        return None
    name = type(scheduler).__name__
    with warnings.catch_warnings():
        # "lr_scheduler.step() before optimizer.step()": this optimizer never steps
        warnings.simplefilter("ignore", UserWarning)
        for step in range(1, steps + 1):
            try:
                scheduler.step()
            except (ArithmeticError, ValueError, TypeError, IndexError) as e:
                return step, f"stepping {name} raised {type(e).__name__}: {e}"
    return None


def check_optimizer_arguments(
    make_optimizer: Callable[[], torch.optim.Optimizer], scheduler_factory: Any
) -> None:
    """Build the optimizer (with ``make_optimizer``) and the scheduler (with
    ``scheduler_factory``, if any) once, and step the scheduler once, so bad arguments fail
    before training with a ``ValueError``: some (``StepLR(step_size=0)``) fail only when the
    scheduler steps, at the end of the first epoch."""
    try:
        opt = make_optimizer()
    except (ValueError, TypeError) as e:
        raise ValueError(f"invalid optimizer arguments: {e}") from e
    if scheduler_factory is not None:
        try:
            sched = scheduler_factory(opt)
        except (ValueError, TypeError) as e:
            raise ValueError(f"invalid lr_scheduler arguments: {e}") from e
        except (ArithmeticError, IndexError) as e:  # CyclicLR(step_size_up=0)
            name = _scheduler_name(scheduler_factory, e)
            raise ValueError(
                f"invalid lr_scheduler arguments: making {name} raised {type(e).__name__}: {e}"
            ) from e
        failure = _first_failing_step(sched, steps=1)
        if failure is not None:
            raise ValueError(f"invalid lr_scheduler arguments: {failure[1]}")


def check_scheduler_fits_trainer(
    sched: torch.optim.lr_scheduler.LRScheduler | torch.optim.lr_scheduler.ReduceLROnPlateau,
    trainer: pl.Trainer,
) -> None:
    """Raise a ``ValueError`` if ``trainer`` cannot run ``sched`` (a throwaway scheduler,
    stepped here): see :meth:`ERMClassifier.check_scheduler`."""
    if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
        if trainer.limit_val_batches == 0:
            raise ValueError(
                "lr_scheduler ReduceLROnPlateau steps on val/loss, which is never computed "
                f"with trainer.limit_val_batches={trainer.limit_val_batches}; validate, or "
                "use a scheduler that needs no metric"
            )
        return
    epochs = _epochs_of_the_fit(trainer)
    failure = _first_failing_step(sched, steps=epochs)
    if failure is not None:
        epoch, why = failure
        raise ValueError(
            f"lr_scheduler {type(sched).__name__} fails at the end of epoch {epoch} of "
            f"trainer.max_epochs={trainer.max_epochs} (it steps once per epoch): {why}"
        )
