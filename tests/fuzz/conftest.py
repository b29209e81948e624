"""The fuzz tests that drive real processes share the reliability fixtures (a maild
factory, the tool check) and its opt-in `slow` marker."""

from tests.reliability.conftest import _slow_is_opt_in, maild_factory, tools  # noqa: F401
