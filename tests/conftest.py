"""Hypothesis profiles: CI replays a fixed set of examples, local runs explore.

A red CI throws away every change made since the last green run, so CI must
not fail on an example nobody can see again: with `CI` set (the CI sets it, and
so does scripts/test-stress) the `ci` profile is loaded, which derandomizes
(every run draws the same examples), drops the per-example deadline (a loaded
2-core machine makes any wall-clock bound a coin toss) and the `too_slow`
health check (timed the same way), and prints the blob that reproduces a
failure. Without `CI` the `dev` profile keeps hypothesis random, so local runs
keep finding new examples; a failing one found that way goes into its test as
an `@example`, so that CI checks it from then on.

`HYPOTHESIS_PROFILE=ci|dev` picks a profile explicitly. A test's own
`@settings` (max_examples, a suppressed health check) still applies on top.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    print_blob=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", deadline=None, print_blob=True)
settings.load_profile(
    os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "dev")
)
