"""The hypothesis settings of every property test (test_properties.py, the kernels',
the per-sample ones): a bounded, derandomized ``ci`` profile by default;
``TORCHBP_HYPOTHESIS_PROFILE=thorough`` draws many more examples."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=12,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "thorough",
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
PROFILE = settings.get_profile(os.environ.get("TORCHBP_HYPOTHESIS_PROFILE", "ci"))
