"""Checks of the fields every backend's `Config` shares (tile sizes, Triton launch options).

Each raises a ValueError naming the field and what it accepts; None always passes (chosen later
from the shapes). bool is not an int here (`Config(num_warps=True)` is a mistake, not 1 warp).
"""

from __future__ import annotations

WARPS = (1, 2, 4, 8, 16)


def is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def check_pow2(name: str, value, minimum: int) -> None:
  if value is not None and (not is_int(value) or value < minimum or value & (value - 1)):
    raise ValueError(f"Config.{name} must be a power of two >= {minimum} or None, got {value!r}")


def check_int_range(name: str, value, low: int, high: int) -> None:
  if value is not None and (not is_int(value) or not low <= value <= high):
    raise ValueError(f"Config.{name} must be an int in [{low}, {high}] or None, got {value!r}")


def check_launch_options(num_warps, num_stages) -> None:
  """Triton's launch options: warps a power of two up to 16, stages a positive int."""
  if num_warps is not None and (not is_int(num_warps) or num_warps not in WARPS):
    raise ValueError(f"Config.num_warps must be one of {WARPS} or None, got {num_warps!r}")
  if num_stages is not None and (not is_int(num_stages) or num_stages < 1):
    raise ValueError(f"Config.num_stages must be a positive int or None, got {num_stages!r}")
