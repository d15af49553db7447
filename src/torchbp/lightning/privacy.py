"""Differentially private training (DP-SGD) for :class:`~torchbp.lightning.ERMClassifier`.

DP-SGD (Abadi et al., 2016) replaces each step's gradient by

    g̃ = ( Σ_{i ∈ batch} clip_C(g_i) + N(0, σ² C² I) ) / L,    clip_C(g) = g · min(1, C / ‖g‖)

where ``g_i`` is sample ``i``'s gradient of the summed loss, ``C`` the max grad norm, ``σ`` the
noise multiplier and ``L`` the *expected* batch size. Batches are drawn by Poisson sampling
(each training sample joins a batch independently with probability ``q = L / N``), which is
what the privacy accountant assumes. The clipped sum comes from one backward pass of
:func:`torchbp.per_sample_grads` in ``clip`` mode; per-sample gradients are never
materialised. The privacy spent, ε at the configured δ, is tracked by Opacus' RDP
accountant (a maintained implementation; torchbp does not write its own).

Examples::

    >>> privacy = Privacy(max_grad_norm=1.0, noise_multiplier=1.1, delta=1e-5)
    >>> sampler = PoissonBatchSampler(1000, sample_rate=0.064, seed=0)
    >>> len(sampler)
    16
"""

from __future__ import annotations

import math
import numbers
import secrets
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Sampler

__all__ = ["PoissonBatchSampler", "Privacy", "PrivacyAccountant", "poisson_batches_per_epoch"]


def poisson_batches_per_epoch(sample_rate: float) -> int:
    """Batches of one epoch of :class:`PoissonBatchSampler`, ``round(1 / sample_rate)`` (at
    least 1): the steps per epoch the accountant calibrates ``target_epsilon`` for."""
    return max(1, round(1 / sample_rate))


@dataclass
class Privacy:
    """The privacy settings of a DP-SGD run.

    Give either ``noise_multiplier`` or ``target_epsilon`` (then the smallest noise
    multiplier that keeps ε ≤ ``target_epsilon`` after the run's steps, ``max_epochs`` of
    batches as ``limit_train_batches`` and ``max_steps`` cut them, is computed by the
    accountant before training; a run resumed from a checkpoint counts the ε its
    steps spent, and calibrates the noise of the steps left so that the whole run meets
    the target, or refuses to train if they already spent it).

    Args:
        max_grad_norm: ``C``, the L2 bound each sample's gradient is clipped to (over all
            trainable parameters together).
        noise_multiplier: ``σ``; the Gaussian noise added to the clipped sum has standard
            deviation ``σ·C``.
        target_epsilon: the ε to reach after the whole run, instead of ``noise_multiplier``.
        delta: the δ of (ε, δ)-DP; it must be below ``1 / N`` (N: training samples),
            and is usually far below it: training refuses ``delta >= 1 / N``
            (:meth:`check_delta`), a δ met by publishing one training sample outright.
        secure_rng: draw the noise and the Poisson batches from generators seeded from
            the system's entropy (:mod:`secrets`) instead of the run's seed. By default
            both are reproducible from the seed in the run's ``config.yaml`` (and the noise
            from the generator state a checkpoint keeps): whoever holds those can compute
            the noise and the batches, and ε does not hold against them. With
            ``secure_rng`` a fit's noise and batches are drawn afresh (two fits of one
            config differ), checkpoints keep no generator state, and a resumed fit draws
            fresh noise and batches, never the earlier ones again. The generators are
            still torch's: not a cryptographically secure generator such as Opacus'
            ``secure_mode``, and no defence against floating-point attacks on the
            Gaussian sampler. A CPU generator keeps 32 bits of its seed (``manual_seed(s)``
            and ``manual_seed(s + 2**32)`` draw the same numbers), so there are 2³² noise
            streams a determined attacker could search; CUDA's keeps 64.
    """

    max_grad_norm: float = 1.0
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    delta: float = 1e-5
    secure_rng: bool = False

    def __post_init__(self) -> None:
        for name in ("max_grad_norm", "noise_multiplier", "target_epsilon", "delta"):
            _check_number(name, getattr(self, name), optional=name in _EITHER_ONE)
        _check_positive("max_grad_norm", self.max_grad_norm)
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError(
                "privacy: give exactly one of noise_multiplier and target_epsilon, got "
                f"noise_multiplier={self.noise_multiplier}, target_epsilon={self.target_epsilon} "
                "(override a config's with null: --model.privacy.target_epsilon null)"
            )
        _check_positive(
            "noise_multiplier",
            self.noise_multiplier,
            " (without noise, clipping alone gives no privacy guarantee)",
        )
        _check_positive("target_epsilon", self.target_epsilon)
        if not 0 < self.delta < 1:
            raise ValueError(f"privacy.delta must be in (0, 1), got {self.delta}")
        if not isinstance(self.secure_rng, bool):
            raise TypeError(f"privacy.secure_rng must be a bool, got {self.secure_rng!r}")

    def check_delta(self, num_samples: int) -> None:
        """Refuse ``delta >= 1 / num_samples``: an (ε, δ) guarantee with such a δ holds even
        for a mechanism that publishes one training sample in full, so it protects nothing.

        Raises:
            ValueError: ``delta`` is not below ``1 / num_samples``.
        """
        if self.delta * num_samples >= 1:
            raise ValueError(
                f"privacy.delta={self.delta:g} is not below 1/N = {1 / num_samples:.3g} "
                f"(N={num_samples} training samples): a guarantee with delta >= 1/N allows "
                "publishing a training sample outright; use a delta far below 1/N, e.g. "
                f"{_suggested_delta(num_samples):g}"
            )


def _suggested_delta(num_samples: int) -> float:
    """A power of ten at most ``1 / (10 N)`` (and at most 1e-5, the usual default)."""
    return min(1e-5, 10.0 ** math.floor(math.log10(0.1 / num_samples)))


# exactly one of them is given
_EITHER_ONE = ("noise_multiplier", "target_epsilon")


def _check_number(name: str, value: object, *, optional: bool) -> None:
    """A real number (``None`` too if ``optional``); ``True`` is not a number here."""
    if value is None and optional:
        return
    if not _is_number(value):
        raise TypeError(f"privacy.{name} must be a number, got {value!r}")


def _is_number(value: object) -> bool:
    """A real number, numpy's too; ``True`` is none here. (A function, not an inline
    ``isinstance``: type checkers know no ``float`` to be a ``numbers.Real``, and would take
    the code after such a check of a ``float`` argument for unreachable.)"""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_int(value: object) -> bool:
    """An int, numpy's too; ``True`` is none here (a function: see :func:`_is_number`)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_positive(name: str, value: float | None, why: str = "") -> None:
    """A ``value`` that is given is finite and above 0 (``why`` ends the error message)."""
    if value is not None and not (math.isfinite(value) and value > 0):
        raise ValueError(f"privacy.{name} must be > 0 and finite, got {value}{why}")


class PoissonBatchSampler(Sampler[list[int]]):
    """Batches drawn by Poisson sampling: each of the ``num_samples`` indices joins each batch
    independently with probability ``sample_rate``, so batch sizes vary around
    ``sample_rate · num_samples`` (and may be 0). One epoch is ``round(1 / sample_rate)``
    batches. The draws are seeded by ``(seed, epoch)``: call :meth:`set_epoch` each epoch.
    A run resumed in mid-epoch must not draw that epoch's first batches again (the
    accountant takes every step's batch as a fresh draw): :meth:`state_dict` says how many
    of the epoch's batches were drawn, and after :meth:`load_state_dict` the next iteration
    of that epoch draws and drops them first. After :meth:`use_secure_rng` (a DP-SGD fit
    with ``Privacy(secure_rng=True)``) every epoch's draws are seeded from the system's
    entropy instead: not reproducible from ``seed``.

    Args:
        num_samples: size of the dataset.
        sample_rate: ``q`` in ``(0, 1]``.
        seed: seed of the draws.

    Examples::

        >>> s = PoissonBatchSampler(10, sample_rate=0.5, seed=0)
        >>> len(s), all(0 <= i < 10 for batch in s for i in batch)
        (2, True)
    """

    def __init__(self, num_samples: int, sample_rate: float, seed: int = 0) -> None:
        for name, value in (("num_samples", num_samples), ("seed", seed)):
            if not _is_int(value):
                raise TypeError(f"PoissonBatchSampler: {name} must be an int, got {value!r}")
        if not _is_number(sample_rate):
            raise TypeError(
                f"PoissonBatchSampler: sample_rate must be a number, got {sample_rate!r}"
            )
        if num_samples < 1:
            raise ValueError(f"PoissonBatchSampler: num_samples must be >= 1, got {num_samples}")
        if not 0 < sample_rate <= 1:
            raise ValueError(
                f"PoissonBatchSampler: sample_rate must be in (0, 1], got {sample_rate}"
            )
        self.num_samples = int(num_samples)
        self.sample_rate = float(sample_rate)
        self.seed = int(seed)  # a numpy integer would overflow in the per-epoch seed
        self.epoch = 0
        self.drawn = 0  # batches of this epoch handed out so far
        self._resume: dict[str, int] | None = None
        #: draws seeded from the system's entropy, not from ``(seed, epoch)``
        self.secure_rng = False

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def use_secure_rng(self) -> None:
        """Seed each epoch's draws from the system's entropy (:mod:`secrets`) from now on,
        instead of ``(seed, epoch)``: batches that whoever knows ``seed`` cannot compute."""
        self.secure_rng = True

    def _epoch_generator(self) -> torch.Generator:
        """The generator of this epoch's draws: seeded by ``(seed, epoch)``, wrapped to the
        64 bits torch's generator takes, or from the system's entropy (``secure_rng``)."""
        if self.secure_rng:
            return torch.Generator().manual_seed(secrets.randbits(64))
        return torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) % 2**64)

    @property
    def sampler(self) -> PoissonBatchSampler:
        """This sampler, where Lightning's fit loop calls ``set_epoch`` at every epoch's start
        (on ``loader.batch_sampler.sampler``), the first epoch of a resumed run included:
        one resumed from a checkpoint saved at a batch's end gets no
        ``on_train_epoch_start``, and without this its epoch replayed epoch 0's draws."""
        return self

    def state_dict(self) -> dict[str, int]:
        """``{"epoch", "drawn"}``: the epoch and how many of its batches were handed out
        (a DataLoader fetching ahead may have taken more than were trained on: dropping
        those on resume loses draws, never repeats one)."""
        return {"epoch": self.epoch, "drawn": self.drawn}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue after :meth:`state_dict`'s draws: the next iteration of its epoch skips
        the batches drawn before (another epoch's iteration starts afresh)."""
        self._resume = {"epoch": int(state["epoch"]), "drawn": int(state["drawn"])}

    def __len__(self) -> int:
        return poisson_batches_per_epoch(self.sample_rate)

    def __iter__(self) -> Iterator[list[int]]:
        resume, self._resume = self._resume, None
        skip = resume["drawn"] if resume is not None and resume["epoch"] == self.epoch else 0
        g = self._epoch_generator()
        self.drawn = 0
        for k in range(len(self)):
            mask = torch.rand(self.num_samples, generator=g) < self.sample_rate
            if k < skip:
                continue  # drawn before the run was resumed
            self.drawn = k + 1
            yield mask.nonzero().flatten().tolist()


def _rdp_epsilon(accountant: Any, delta: float) -> float:
    """ε of an Opacus RDP ``accountant``'s steps at ``delta``, without its warning that the
    optimal order is the largest or smallest alpha (the bound holds, only less tight)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the (largest|smallest) alpha")
        return float(accountant.get_epsilon(delta=delta))


def _steps_in(history: list[tuple]) -> int:
    """The steps of an accountant's ``(σ, q, steps)`` history."""
    return sum(n for _, _, n in history)


#: the largest noise multiplier the search for ``target_epsilon`` tries
_MAX_NOISE = 1e6


def _noise_for_target(
    privacy: Privacy, sample_rate: float, steps: int, spent: list[tuple] | None = None
) -> float:
    """The smallest σ (within ε tolerance 0.01, or 1% of a target below 1) with
    ε ≤ ``privacy.target_epsilon`` after the ``spent`` steps (the accountant's
    ``(σ, q, steps)`` history of a resumed run) and ``steps`` Poisson-sampled steps of
    noise σ, found by bisection on Opacus' RDP accountant."""
    from opacus.accountants import RDPAccountant

    target, spent = privacy.target_epsilon, list(spent or [])
    assert target is not None

    def epsilon(history: list[tuple]) -> float:
        accountant = RDPAccountant()
        accountant.history = history
        return _rdp_epsilon(accountant, privacy.delta)

    where = f"at delta={privacy.delta} over {steps} steps of sample rate {sample_rate:.4g}"
    if spent:
        already = epsilon(spent)
        if not already < target:
            raise ValueError(
                f"privacy.target_epsilon={target} is already spent: the "
                f"{_steps_in(spent)} steps taken before (the checkpoint's) spent "
                f"epsilon={already:.4g}, so no noise keeps {steps} more steps within it; "
                "raise target_epsilon, or do not train further"
            )
        where += f" after the {_steps_in(spent)} steps taken before"
    tolerance = min(0.01, 0.01 * target)
    low, high = 0.0, 20.0
    high_epsilon = epsilon([*spent, (high, sample_rate, steps)])
    while high_epsilon > target:
        low, high = high, 2 * high
        if high > _MAX_NOISE:
            raise ValueError(
                f"privacy.target_epsilon={target} cannot be reached {where}: no noise "
                f"multiplier up to {_MAX_NOISE:g} reaches it; raise target_epsilon or "
                "delta, or train for fewer epochs"
            )
        high_epsilon = epsilon([*spent, (high, sample_rate, steps)])
    for _ in range(200):  # more halvings than a float has bits: never loops forever
        if target - high_epsilon <= tolerance:
            break
        middle = (low + high) / 2
        middle_epsilon = epsilon([*spent, (middle, sample_rate, steps)])
        if middle_epsilon <= target:
            high, high_epsilon = middle, middle_epsilon
        else:
            low = middle
    return high


class PrivacyAccountant:
    """ε spent so far by DP-SGD steps with Poisson sampling (Opacus' RDP accountant).

    Args:
        privacy: the run's settings.
        sample_rate: ``q``, the probability that a sample joins a batch.
        epochs: the epochs the run still trains (all of a fresh run's), used to find the
            noise multiplier for ``target_epsilon``: ``epochs ×
            poisson_batches_per_epoch(sample_rate)`` steps to come, the batches
            :class:`PoissonBatchSampler` draws (a run resumed mid-epoch takes fewer).
        steps: the steps the run still takes, instead of ``epochs`` (what the trainer will
            take: ``ERMClassifier`` counts ``limit_train_batches`` and ``max_steps``).

    Attributes:
        noise_multiplier: ``σ`` of the steps to come, given or computed from
            ``target_epsilon``: the smallest that keeps ε ≤ ``target_epsilon`` after the
            steps to come and those taken before (:meth:`load_state_dict` computes it again
            for a resumed run's; a run with no epoch left keeps the last σ).

    Raises:
        ModuleNotFoundError: Opacus is not installed (``pip install opacus``).
        ValueError: ``target_epsilon`` cannot be reached over the run, whatever the noise
            (:meth:`load_state_dict` too: the steps taken before already spent it).
    """

    def __init__(
        self, privacy: Privacy, sample_rate: float, epochs: int = 0, *, steps: int | None = None
    ) -> None:
        try:
            from opacus.accountants import RDPAccountant
        except ModuleNotFoundError as e:  # pragma: no cover - opacus is in the train extra
            raise ModuleNotFoundError(
                "DP-SGD's privacy accounting uses Opacus: pip install 'opacus>=1.5'"
            ) from e
        self.privacy = privacy
        self.sample_rate = sample_rate
        # the steps to come (Opacus' epochs= would assume int(epochs / q))
        if steps is None:
            steps = epochs * poisson_batches_per_epoch(sample_rate)
        self._steps_to_come = steps
        self._rdp = RDPAccountant()
        self.noise_multiplier = self._noise_for_steps_to_come()

    def _noise_for_steps_to_come(self) -> float:
        """σ for the steps the run has still to take (see :attr:`noise_multiplier`)."""
        if self.privacy.noise_multiplier is not None:
            return float(self.privacy.noise_multiplier)
        if self._steps_to_come <= 0 and self._rdp.history:  # the run is over
            return float(self._rdp.history[-1][0])
        steps = max(self._steps_to_come, 1)
        return _noise_for_target(self.privacy, self.sample_rate, steps, self._rdp.history)

    @property
    def steps(self) -> int:
        """Noisy steps taken so far."""
        return _steps_in(self._rdp.history)

    def state_dict(self) -> dict:
        """What a checkpoint keeps: the steps taken, as ``(σ, q, steps)`` triples."""
        return {"history": [list(h) for h in self._rdp.history]}

    def load_state_dict(self, state: dict) -> None:
        """Continue from :meth:`state_dict`'s steps (a resumed run): ε keeps counting, and
        with ``target_epsilon`` the noise of the steps to come is calibrated so that the
        whole run, these steps included, meets it.

        Raises:
            ValueError: ``target_epsilon`` cannot be met: these steps already spent it, or
                the steps left exceed it whatever the noise. The accountant is unchanged.
        """
        history = self._rdp.history
        self._rdp.history = [tuple(h) for h in state["history"]]
        try:
            self.noise_multiplier = self._noise_for_steps_to_come()
        except BaseException:
            self._rdp.history = history
            raise

    def step(self) -> None:
        """Record one noisy step."""
        self._rdp.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)

    def epsilon(self) -> float:
        """ε spent so far at the configured δ (0 before the first step)."""
        if not self._rdp.history:
            return 0.0
        eps = _rdp_epsilon(self._rdp, self.privacy.delta)
        return eps if math.isfinite(eps) else math.inf
