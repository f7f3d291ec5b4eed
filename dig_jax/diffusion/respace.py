"""Timestep respacing: sample with a subset of the training process's steps (ADM semantics)."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from dig_jax.diffusion.gaussian import Schedule, linear_betas, make_schedule


def space_timesteps(num_timesteps: int, section_counts: int | str | Sequence[int]) -> set[int]:
  """The original steps to keep.

  `section_counts` splits [0, num_timesteps) into equal sections and takes that many evenly
  spaced steps from each, both ends of a section included: 250, "250", "10,15,20" or [10, 15, 20].
  "ddimN" instead takes every k-th step from 0 with the integer stride k giving exactly N steps.
  """
  if isinstance(section_counts, str):
    if section_counts.startswith("ddim"):
      want = int(section_counts[len("ddim"):])
      for stride in range(1, num_timesteps):
        steps = range(0, num_timesteps, stride)
        if len(steps) == want:
          return set(steps)
      raise ValueError(f"no integer stride gives exactly {want} of {num_timesteps} steps")
    section_counts = [int(c) for c in section_counts.split(",")]
  elif isinstance(section_counts, int):
    section_counts = [section_counts]

  base, extra = divmod(num_timesteps, len(section_counts))
  kept, start = [], 0
  for i, count in enumerate(section_counts):
    size = base + (1 if i < extra else 0)
    if not 0 < count <= size:
      raise ValueError(f"cannot take {count} steps from a section of {size}")
    stride = 1 if count == 1 else (size - 1) / (count - 1)
    # Accumulate the fractional position and round it (half to even) step by step, as ADM
    # does, so the kept set is identical to the reference implementation's.
    pos = 0.0
    for _ in range(count):
      kept.append(start + round(pos))
      pos += stride
    start += size
  return set(kept)


def respaced_schedule(betas, use_timesteps) -> Schedule:
  """The schedule that jumps between the kept steps of the process defined by `betas`.

  New betas are chosen so that alphas_cumprod at each kept step equals the original one.
  """
  alphas_cumprod = np.cumprod(1.0 - np.asarray(betas, dtype=np.float64))
  kept = np.array(sorted(use_timesteps), dtype=np.int64)
  if kept.size == 0 or kept[0] < 0 or kept[-1] >= alphas_cumprod.size:
    raise ValueError(f"use_timesteps must be a non-empty subset of [0, {alphas_cumprod.size})")
  ac = alphas_cumprod[kept]
  new_betas = 1.0 - ac / np.append(1.0, ac[:-1])
  return make_schedule(new_betas, timestep_map=kept)


def create_schedule(num_timesteps: int = 1000,
                    sampling_steps: int | str | Sequence[int] | None = None) -> Schedule:
  """The linear-beta schedule, respaced to `space_timesteps(num_timesteps, sampling_steps)`
  when `sampling_steps` is given."""
  betas = linear_betas(num_timesteps)
  if sampling_steps is None:
    return make_schedule(betas)
  return respaced_schedule(betas, space_timesteps(num_timesteps, sampling_steps))
