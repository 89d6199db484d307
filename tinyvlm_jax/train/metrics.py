"""What a user watches: a progress bar, metrics.jsonl, TensorBoard events and a loss-curve PNG.

Only process 0 writes. On resume, metrics.jsonl is cut back to the restored step (a killed
run may have logged steps past its last checkpoint), and TensorBoard is told to purge the
events past it, so both logs read as if the run had never stopped.
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Any, Iterable

import jax

METRICS_FILE = "metrics.jsonl"
CURVE_FILE = "loss_curve.png"


def read_metrics(path: str) -> list[dict[str, Any]]:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def truncate_metrics(path: str, last_step: int) -> None:
  """Keeps the records with step <= last_step."""
  rows = [r for r in read_metrics(path) if r.get("step", 0) <= last_step]
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")
  os.replace(tmp, path)


def _summary_writer():
  """tensorboardX's SummaryWriter class, imported without torch.

  tensorboardX imports torch whenever it is installed, only to accept torch tensors; this logger
  writes Python floats, and the import cost every training run 3-4 s of start-up here. torch is
  hidden for the length of the import (unless something imported it already) and importable again
  afterwards.
  """
  if "tensorboardX" in sys.modules or "torch" in sys.modules:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    return SummaryWriter
  sys.modules["torch"] = None  # makes `import torch` raise ImportError
  try:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
  finally:
    del sys.modules["torch"]
  return SummaryWriter


class MetricsLogger:
  """metrics.jsonl + TensorBoard (tensorboardX) + a tqdm bar, in `stage_dir`."""

  def __init__(self, stage_dir: str, *, start_step: int, total_steps: int, stage: str, enabled: bool | None = None,
               progress: bool = True):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.path = os.path.join(stage_dir, METRICS_FILE)
    self.stage = stage
    self._bar = None
    self._tb = None
    if not self.enabled:
      return
    os.makedirs(stage_dir, exist_ok=True)
    truncate_metrics(self.path, start_step)
    self._tb = _summary_writer()(os.path.join(stage_dir, "tb"), purge_step=start_step + 1 if start_step else None)
    if progress:
      from tqdm import tqdm  # pylint: disable=g-import-not-at-top
      self._bar = tqdm(total=total_steps, initial=start_step, desc=stage, unit="step", dynamic_ncols=True,
                       mininterval=1.0)

  def write(self, step: int, metrics: dict[str, Any]) -> None:
    if not self.enabled:
      return
    row = {"step": int(step), **{k: (float(v) if not isinstance(v, str) else v) for k, v in metrics.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")
    for k, v in row.items():
      if k != "step" and isinstance(v, float) and math.isfinite(v):
        self._tb.add_scalar(f"{self.stage}/{k}", v, step)
    if self._bar is not None:
      self._bar.update(step - self._bar.n)
      self._bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row.get('lr', 0.0):.2e}",
                            tok_s=f"{row.get('tokens_per_s', 0.0):.0f}", step_s=f"{row.get('step_s', 0.0):.2f}",
                            refresh=False)

  def message(self, text: str) -> None:
    if not self.enabled:
      return
    if self._bar is not None:
      self._bar.write(text)
    else:
      print(text, flush=True)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
      self._bar = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def plot_loss_curves(curves: Iterable[tuple[str, list[dict[str, Any]]]], out_png: str) -> str:
  """Loss against the global step, one line per stage (stages laid end to end). Returns the path."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(8, 4.5))
  offset = 0
  for name, rows in curves:
    rows = [r for r in rows if "loss" in r and math.isfinite(r["loss"])]
    if not rows:
      continue
    ax.plot([offset + r["step"] for r in rows], [r["loss"] for r in rows], label=name, linewidth=1.2)
    offset += max(r["step"] for r in rows)
  ax.set_xlabel("step")
  ax.set_ylabel("training loss (per supervised token)")
  ax.set_yscale("log")
  ax.grid(True, alpha=0.3)
  ax.legend()
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
  fig.savefig(out_png, dpi=110)
  plt.close(fig)
  return out_png
