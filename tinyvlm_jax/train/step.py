"""The train state and the jitted train step (gradient accumulation, NEFTune, sharding).

Only the trainable leaves are differentiated; frozen ones (modules outside `trainable`,
paths matching `frozen`) pass through the step unchanged, bit for bit. The global batch is split into `grad_accum_steps` micro-batches
scanned in order; the summed loss and gradients are divided once by the number of
supervised tokens in the whole global batch.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from tinyvlm_jax.models.tinyvlm import TinyVLM
from tinyvlm_jax.train import optimizer as optim_lib
from tinyvlm_jax.train import sharding as shd
from tinyvlm_jax.train.loss import neftune_noise, summed_cross_entropy


@flax.struct.dataclass
class TrainState:
  step: jax.Array       # [] int32: optimiser steps taken
  params: Any           # full model params (frozen modules included)
  opt_state: Any        # state of the trainable modules only
  rng: jax.Array        # [2] uint32 raw PRNG key


@dataclasses.dataclass(frozen=True)
class StepConfig:
  trainable: tuple[str, ...]
  frozen: tuple[str, ...] = ()  # regexes of parameter paths held fixed inside trainable modules
  grad_accum_steps: int = 1
  neftune_alpha: float = 0.0
  max_targets: int = 0


def init_state(params, tx: optax.GradientTransformation, seed: int) -> TrainState:
  return TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params),
                    rng=jax.random.PRNGKey(seed))


def state_specs(params_specs, tx: optax.GradientTransformation, params) -> TrainState:
  """PartitionSpecs of the whole state: an optimiser moment takes the spec of its parameter.

  A state leaf belongs to a parameter when the trailing dict keys of its path spell that
  parameter's path and the shapes agree (multi_transform nests the moments under labels).
  """
  table = {}
  for (path, x), spec in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                             jax.tree.leaves(params_specs, is_leaf=lambda s: isinstance(s, P))):
    table[shd.path_name(path)] = (tuple(x.shape), spec)

  def spec_of(path, leaf):
    names = [str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)]
    for i in range(len(names)):
      hit = table.get("/".join(names[i:]))
      if hit is not None and hit[0] == tuple(leaf.shape):
        return hit[1]
    return P()

  abstract = jax.eval_shape(tx.init, params)
  opt_specs = jax.tree_util.tree_map_with_path(spec_of, abstract)
  return TrainState(step=P(), params=params_specs, opt_state=opt_specs, rng=P())


def state_shardings(mesh: Mesh, params_specs, tx, params) -> TrainState:
  return shd.named(mesh, state_specs(params_specs, tx, params))


def _split_micro(x, k: int):
  """[B, ...] -> [k, B/k, ...]; micro-batch j holds rows j, j+k, j+2k, ... (keeps row sharding)."""
  if x.shape[0] % k:
    raise ValueError(f"batch of {x.shape[0]} rows does not split into {k} micro-batches")
  return jnp.swapaxes(x.reshape((x.shape[0] // k, k) + x.shape[1:]), 0, 1)


def make_train_step(model: TinyVLM, tx: optax.GradientTransformation, cfg: StepConfig,
                    schedule: Callable[[Any], Any] | None = None, mesh: Mesh | None = None):
  """(state, batch) -> (state, metrics); batch is the global batch dict of the pipeline."""
  dim = model.config.llm.hidden_size
  compute_dtype = jnp.dtype(model.config.dtype)

  def micro_loss(train_params, frozen, mb, rng):
    params = optim_lib.merge(frozen, train_params)
    if mesh is not None and mb.get("cnn_pixel_values") is not None:
      mb = {**mb, "cnn_pixel_values": shd.spread_over_all_axes(mb["cnn_pixel_values"], mesh)}
    noise = None
    if cfg.neftune_alpha > 0:
      noise = neftune_noise(rng, mb["attention_mask"], dim, cfg.neftune_alpha, compute_dtype, mb["row_ids"])
    return summed_cross_entropy(model, params, mb, text_noise=noise, max_targets=cfg.max_targets)

  grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

  def step(state: TrainState, batch: dict[str, jax.Array]):
    labels = optim_lib.param_labels(state.params, cfg.trainable, cfg.frozen)
    train_params, frozen = optim_lib.split_trainable(state.params, labels)
    rng = jax.random.fold_in(state.rng, state.step)
    k = cfg.grad_accum_steps
    # NEFTune's per-row key: the record's own key from the pipeline (the same whichever process
    # or row it lands in), else the global row index.
    rows = batch.get("example_key", jnp.arange(batch["input_ids"].shape[0], dtype=jnp.int32))
    batch = {key: x for key, x in batch.items() if key != "example_key"}
    micro = {key: _split_micro(x, k) for key, x in {**batch, "row_ids": rows}.items()}

    def body(carry, mb):
      loss_sum, count, grads = carry
      (loss, n), g = grad_fn(train_params, frozen, mb, rng)
      return (loss_sum + loss, count + n, jax.tree.map(jnp.add, grads, g)), None

    zeros = jax.tree.map(jnp.zeros_like, train_params)
    init = (jnp.float32(0.0), jnp.int32(0), zeros)
    if k == 1:
      (loss_sum, count, grads), _ = body(init, jax.tree.map(lambda x: x[0], micro))
    else:
      (loss_sum, count, grads), _ = jax.lax.scan(body, init, micro)
    denom = jnp.maximum(count, 1).astype(jnp.float32)
    grads = jax.tree.map(lambda g: g / denom, grads)
    full_grads = optim_lib.merge(jax.tree.map(jnp.zeros_like, frozen), grads)
    updates, opt_state = tx.update(full_grads, state.opt_state, state.params)
    updated, _ = optim_lib.split_trainable(optax.apply_updates(state.params, updates), labels)
    new_params = optim_lib.merge(frozen, updated)  # frozen leaves pass through untouched
    metrics = dict(loss=loss_sum / denom, supervised_tokens=count,
                   tokens=jnp.sum(batch["attention_mask"].astype(jnp.int32)),
                   grad_norm=optax.tree.norm(grads))
    if schedule is not None:
      metrics["lr"] = jnp.asarray(schedule(state.step), jnp.float32)
    return TrainState(step=state.step + 1, params=new_params, opt_state=opt_state, rng=state.rng), metrics

  return step


def jit_train_step(step_fn, mesh: Mesh, shardings: TrainState, batch_example: dict[str, Any]):
  """jit with explicit in/out shardings; the state is donated."""
  batch_sh = shd.batch_sharding(mesh, batch_example)
  replicated = NamedSharding(mesh, P())
  return jax.jit(step_fn, in_shardings=(shardings, batch_sh), out_shardings=(shardings, replicated),
                 donate_argnums=(0,))


def create_sharded_state(params, tx, seed: int, shardings: TrainState) -> TrainState:
  """Places params (host or device arrays) on the mesh and builds the optimiser state there."""
  params = jax.device_put(params, shardings.params)
  make = jax.jit(lambda p: init_state(p, tx, seed), in_shardings=(shardings.params,), out_shardings=shardings)
  return make(params)
