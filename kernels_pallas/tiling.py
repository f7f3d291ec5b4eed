"""Block sizes for the Triton kernels, whose block dims must be powers of two."""
from __future__ import annotations


def largest_pow2_divisor(n: int, cap: int) -> int:
  """The largest power of two that divides n and is at most cap (1 if n is odd)."""
  p = 1
  while p * 2 <= cap and n % (p * 2) == 0:
    p *= 2
  return p
