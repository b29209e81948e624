"""How long tests wait for a condition before giving up (a wait, never a timed assertion).

Every wait helper returns as soon as its condition holds, so a generous limit costs
nothing when the test passes; it only decides how long a broken test takes to fail. CI
machines are shared and can be several times slower than a laptop, so limits are scaled:
MAILD_TEST_WAIT_SCALE, else 4 under CI=true and 2 elsewhere.
"""

from __future__ import annotations

import os


def _scale() -> float:
    env = os.environ.get("MAILD_TEST_WAIT_SCALE")
    if env:
        return float(env)
    return 4.0 if os.environ.get("CI") == "true" else 2.0


SCALE = _scale()


def patience(seconds: float) -> float:
    """The limit to wait for something that normally takes well under `seconds`."""
    return seconds * SCALE
