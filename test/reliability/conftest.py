"""Hypothesis profiles for the long suite: `ci` (the default) is derandomised, so every run of
CI tries the same examples; `long` tries ten times as many, from fresh random seeds:

    .venv/bin/python -m pytest test/reliability --hypothesis-profile=long
"""

from hypothesis import HealthCheck, settings

settings.register_profile("ci", derandomize=True, max_examples=1000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=10000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci")
