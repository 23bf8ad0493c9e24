"""Hypothesis example budgets: each test states its CI budget; the `thorough` profile multiplies it by 20."""
import os

from hypothesis import settings

SCALE = 20 if os.environ.get("HYPOTHESIS_PROFILE") == "thorough" else 1


def examples(n: int) -> settings:
    return settings(max_examples=n * SCALE)
