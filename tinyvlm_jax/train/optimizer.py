"""AdamW with a stage's schedule, global-norm clipping and per-module LR multipliers.

Labels are the top-level modules of the params (vision, pooler, connector, llm, cnn,
fuser). A module outside `trainable`, or a leaf matching a `frozen` regex, gets
`optax.set_to_zero()`: no update and no optimiser state (optax.multi_transform masks it
out of the AdamW moments).
"""

from __future__ import annotations

import re
from typing import Mapping, Sequence

import jax.numpy as jnp
import optax
from flax import traverse_util


def make_schedule(kind: str, lr_max: float, lr_min: float, steps: int, warmup_steps: int = 0) -> optax.Schedule:
  """kind: linear (lr_max -> lr_min over the steps after warmup) | cosine | constant (lr_max)."""
  decay_steps = max(int(steps) - int(warmup_steps), 1)
  if kind == "linear":
    main = optax.linear_schedule(lr_max, lr_min, decay_steps)
  elif kind == "cosine":
    main = optax.cosine_decay_schedule(lr_max, decay_steps, alpha=(lr_min / lr_max) if lr_max else 0.0)
  elif kind == "constant":
    main = optax.constant_schedule(lr_max)
  else:
    raise ValueError(f"schedule.kind={kind!r}; expected one of 'linear', 'cosine', 'constant'")
  if warmup_steps <= 0:
    return main
  warmup = optax.linear_schedule(0.0, lr_max, int(warmup_steps))
  return optax.join_schedules([warmup, main], [int(warmup_steps)])


def param_labels(params, trainable: Sequence[str], frozen: Sequence[str] = ()) -> dict:
  """A tree like `params` of labels: the module name where the leaf trains, else 'frozen'.

  A leaf trains when its top-level module is in `trainable` and its path
  ('llm/embed_tokens/embedding') matches none of the `frozen` regexes.
  """
  unknown = sorted(set(trainable) - set(params))
  if unknown:
    raise ValueError(f"trainable module(s) {unknown} are not in the model; its modules are {sorted(params)}")
  patterns = [re.compile(p) for p in frozen]
  flat = traverse_util.flatten_dict(params, sep="/")
  labels = {}
  for path in flat:
    module = path.split("/", 1)[0]
    trains = module in trainable and not any(p.fullmatch(path) for p in patterns)
    labels[path] = module if trains else "frozen"
  return traverse_util.unflatten_dict(labels, sep="/")


def split_trainable(params, labels) -> tuple[dict, dict]:
  """-> (trainable leaves, frozen leaves), each a nested dict holding only its leaves."""
  flat = traverse_util.flatten_dict(params, sep="/")
  flat_labels = traverse_util.flatten_dict(labels, sep="/")
  train = {k: v for k, v in flat.items() if flat_labels[k] != "frozen"}
  frozen = {k: v for k, v in flat.items() if flat_labels[k] == "frozen"}
  return traverse_util.unflatten_dict(train, sep="/"), traverse_util.unflatten_dict(frozen, sep="/")


def merge(a: dict, b: dict) -> dict:
  """Deep union of two nested dicts with disjoint leaves."""
  flat = {**traverse_util.flatten_dict(a, sep="/"), **traverse_util.flatten_dict(b, sep="/")}
  return traverse_util.unflatten_dict(flat, sep="/")


def make_optimizer(params, *, trainable: Sequence[str], schedule: optax.Schedule, frozen: Sequence[str] = (),
                   lr_mults: Mapping[str, float] | None = None, lr_warmup: Mapping[str, int] | None = None,
                   b1: float = 0.9, b2: float = 0.999,
                   eps: float = 1e-8, weight_decay: float = 0.0, clip_norm: float = 1.0
                   ) -> optax.GradientTransformation:
  """clip_by_global_norm -> per-module AdamW(schedule * lr_mult * warmup); frozen leaves set to zero.

  lr_warmup[module] = N ramps that module's LR linearly from 0 over its first N steps (on top
  of the stage schedule), e.g. to hold a tower still while the rest of the model settles.
  """
  lr_mults = dict(lr_mults or {})
  unknown = sorted(k for k, m in lr_mults.items() if k not in params and float(m) != 1.0)
  if unknown:
    raise ValueError(f"lr_mults names module(s) {unknown} that are not in the model ({sorted(params)})")
  labels = param_labels(params, trainable, frozen)
  transforms = {"frozen": optax.set_to_zero()}
  lr_warmup = {k: int(v) for k, v in (lr_warmup or {}).items() if int(v) > 0}
  for name in trainable:
    mult = float(lr_mults.get(name, 1.0))
    warm = lr_warmup.get(name, 0)
    if mult == 1.0 and not warm:
      lr = schedule
    else:
      lr = (lambda step, m=mult, w=warm: schedule(step) * m * (jnp.minimum(1.0, step / w) if w else 1.0))
    transforms[name] = optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
  chain = [optax.clip_by_global_norm(clip_norm)] if clip_norm and clip_norm > 0 else []
  return optax.chain(*chain, optax.multi_transform(transforms, labels))
