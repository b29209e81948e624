"""Fuzzing budget: the default run is short (CI); MAILD_SLOW=1 multiplies every example
count by 10 and runs the atheris target longer (see docs/reliability.md)."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

SLOW = os.environ.get("MAILD_SLOW") == "1"


def budget(examples: int, **kw: object) -> settings:
    """Hypothesis settings for a fuzz test: `examples` by default, x10 with MAILD_SLOW=1.

    No deadline: a slow example is reported by the tests' own bounds, not as flakiness.
    """
    return settings(
        max_examples=examples * (10 if SLOW else 1),
        deadline=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.function_scoped_fixture,
        ],
        **kw,
    )
