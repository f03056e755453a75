"""Helpers shared by the benchmarks: JSON output and medians over repeats."""

from __future__ import annotations

import json
import statistics
import sys


def report(name: str, value: float, unit: str, **details: object) -> None:
    """Print one figure as a JSON line."""
    print(json.dumps({"name": name, "value": round(value, 4), "unit": unit, **details}))
    sys.stdout.flush()


def median(values: list[float]) -> float:
    return statistics.median(values)
