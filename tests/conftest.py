"""Hypothesis: CI (``CI`` set, as `.ci/run` runs) draws the same examples every run, so a landing
never depends on luck; elsewhere every run explores new ones (and a failure prints how to replay it)."""

import os

from hypothesis import settings

settings.register_profile("ci", derandomize=True, print_blob=True)
settings.register_profile("explore", print_blob=True)
settings.load_profile("ci" if os.environ.get("CI") else "explore")
