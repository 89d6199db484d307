"""Fixed positional embeddings in numpy, shared by the Flax fuser and the PyTorch one (no JAX import)."""

from __future__ import annotations

import numpy as np


def sincos_2d(grid: int, width: int, *, frame: int) -> np.ndarray:
  """Fixed 2D sin-cos embedding [grid*grid, width] at the centres of a grid x grid tiling of [0,1]^2.

  Coordinates are expressed in units of 1/`frame` (the ViT patch grid), so a CNN cell and the
  ViT patches covering the same region get nearby positions whatever their grid sizes.
  Half of the channels encode y, half x; each half is [sin, cos] over `width/4` frequencies.
  """
  if width % 4:
    raise ValueError(f"sincos_2d: width {width} must be divisible by 4")
  centres = (np.arange(grid, dtype=np.float64) + 0.5) / grid * frame  # [grid]
  yy, xx = np.meshgrid(centres, centres, indexing="ij")
  omega = 1.0 / 10000 ** (np.arange(width // 4, dtype=np.float64) / (width // 4))

  def enc(pos):
    out = pos.reshape(-1)[:, None] * omega[None]
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)
  return np.concatenate([enc(yy), enc(xx)], axis=1).astype(np.float32)
