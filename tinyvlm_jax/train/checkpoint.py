"""Training checkpoints: an orbax CheckpointManager with two items per step.

  STAGE_DIR/checkpoints/<step>/state   params, optimiser state, step, RNG (orbax PyTree, async)
  STAGE_DIR/checkpoints/<step>/data    the input pipeline's state, one JSON file per process
                                       (grain's orbax handler: process_<i>-of-<n>.json)

Orbax writes a step into a temporary folder and renames it when complete, so a process
killed during a save leaves the previous steps intact; unfinished temporaries are
ignored and removed on the next start. The state is stored as plain dicts keyed by
parameter path (optax's empty MaskedNode placeholders have no leaves to store), and
restored onto whatever mesh the resuming run uses: 8 devices -> 1 and back work alike.
"""

from __future__ import annotations

import json
import os
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from tinyvlm_jax.train import sharding as shd
from tinyvlm_jax.train.step import TrainState

STATE, DATA = "state", "data"


class JsonState:
  """Adapts an object with get_state() -> dict / set_state(dict) to grain's checkpoint handler."""

  def __init__(self, obj):
    self.obj = obj

  def get_state(self) -> bytes:
    return json.dumps(self.obj.get_state(), indent=1, sort_keys=True).encode()

  def set_state(self, state: bytes) -> None:
    self.obj.set_state(json.loads(state.decode()))

  def start_prefetch(self) -> None:  # called by grain's handler after a restore
    pass


def _flat(tree) -> dict[str, Any]:
  return {shd.path_name(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def state_to_tree(state: TrainState) -> dict[str, Any]:
  """TrainState -> {"step", "rng", "params": {...}, "opt_state": {path: leaf}} (no empty nodes)."""
  return {"step": state.step, "rng": state.rng, "params": state.params, "opt_state": _flat(state.opt_state)}


def tree_to_state(tree: dict[str, Any], template: TrainState) -> TrainState:
  """Inverse of `state_to_tree`, using `template` (e.g. from jax.eval_shape) for the optimiser's structure."""
  leaves_with_paths, treedef = jax.tree_util.tree_flatten_with_path(template.opt_state)
  names = [shd.path_name(p) for p, _ in leaves_with_paths]
  missing = sorted(set(names) - set(tree["opt_state"]))
  if missing:
    raise ValueError(f"checkpoint lacks optimiser state entries {missing[:5]}{' ...' if len(missing) > 5 else ''}: "
                     "it was written for other trainable modules or another optimiser")
  opt_state = jax.tree_util.tree_unflatten(treedef, [tree["opt_state"][n] for n in names])
  return TrainState(step=tree["step"], params=tree["params"], opt_state=opt_state, rng=tree["rng"])


class Checkpointer:
  """Saves and restores (TrainState, pipeline) pairs under `directory`."""

  def __init__(self, directory: str, *, every_steps: int, keep: int, use_async: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=1,  # the loop decides when to save
        max_to_keep=keep,
        enable_async_checkpointing=use_async,
        cleanup_tmp_directories=True,
        create=True,
    )
    self.every_steps = int(every_steps)
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={STATE: ocp.StandardCheckpointHandler(), DATA: grain.checkpoint.CheckpointHandler()})

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state: TrainState, pipeline=None, *, force: bool = False) -> bool:
    """Starts an (async) save of `state` and the pipeline's position at `step`."""
    items = {STATE: ocp.args.StandardSave(state_to_tree(state))}
    if pipeline is not None:
      items[DATA] = grain.checkpoint.CheckpointSave(JsonState(pipeline))
    return self.manager.save(int(step), args=ocp.args.Composite(**items), force=force)

  def restore(self, template: TrainState, shardings: TrainState, pipeline=None, step: int | None = None):
    """-> TrainState at `step` (default: latest) placed with `shardings`; sets the pipeline's position."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), template, shardings)
    items = {STATE: ocp.args.StandardRestore(state_to_tree(abstract))}
    if pipeline is not None:
      items[DATA] = grain.checkpoint.CheckpointRestore(JsonState(pipeline))
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    return tree_to_state(restored[STATE], template)

  def restore_params(self, step: int | None = None) -> dict[str, Any]:
    """Only the params at `step` (default latest), as host numpy arrays."""
    step = self.latest_step() if step is None else step
    meta = self.manager.item_metadata(step)[STATE]
    target = jax.tree.map(lambda m: np.empty(m.shape, m.dtype), meta.tree if hasattr(meta, "tree") else meta)
    restored = self.manager.restore(step, args=ocp.args.Composite(**{STATE: ocp.args.StandardRestore(target)}))
    return restored[STATE]["params"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
