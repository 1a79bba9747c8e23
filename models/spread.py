"""The spread every summary of the service reports: mean and sample standard deviation."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def mean_sd(values: Sequence[float | None]) -> dict[str, Any]:
    """{"mean", "sd", "n"} of the values that are not None: sd is the sample standard
    deviation (n - 1), None for fewer than two values; mean is None for none."""
    present = [v for v in values if v is not None]
    n = len(present)
    mean = sum(present) / n if n else None
    sd = math.sqrt(sum((v - mean) ** 2 for v in present) / (n - 1)) if n > 1 else None
    return {"mean": mean, "sd": sd, "n": n}
