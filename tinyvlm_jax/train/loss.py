"""Next-token cross-entropy over supervised tokens, and NEFTune noise.

Shift: the logits at position t predict token t+1, and that target counts when
`loss_mask[t+1]` is True. The loss of a batch is the *sum* of the target
cross-entropies; the train step divides by the number of supervised tokens in the
global batch, so gradient accumulation and sharding do not change the result.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from tinyvlm_jax.models.tinyvlm import TinyVLM


def neftune_noise(rng, attention_mask, dim: int, alpha: float, dtype=jnp.float32, row_ids=None):
  """NEFTune: U(-1, 1) * alpha / sqrt(L * d) with L = each sample's unpadded length.

  attention_mask [B, L] -> noise [B, L, d], zero on padding. Row i draws from
  fold_in(rng, row_ids[i]) (default: its index), so a row's noise does not depend on how
  the global batch is split into micro-batches or over devices.
  """
  mask = attention_mask.astype(jnp.float32)
  row_ids = jnp.arange(mask.shape[0]) if row_ids is None else row_ids
  lengths = jnp.maximum(jnp.sum(mask, axis=1), 1.0)  # [B]
  scale = alpha / jnp.sqrt(lengths * dim)  # [B]
  keys = jax.vmap(lambda i: jax.random.fold_in(rng, i))(row_ids)
  noise = jax.vmap(lambda k: jax.random.uniform(k, (mask.shape[1], dim), jnp.float32, -1.0, 1.0))(keys)
  return (noise * (scale[:, None] * mask)[..., None]).astype(dtype)


def shifted_targets(input_ids, loss_mask):
  """-> targets [B, L-1] (token t+1) and weights [B, L-1] (loss_mask[t+1])."""
  return input_ids[:, 1:], loss_mask[:, 1:].astype(bool)


def target_positions(weights, max_targets: int):
  """Positions of the first `max_targets` supervised targets of each row, in order.

  weights [B, L-1] bool -> index [B, K] int32, valid [B, K] bool (False = filler).
  """
  order = jnp.argsort(~weights, axis=1, stable=True)[:, :max_targets]  # supervised first, in order
  return order.astype(jnp.int32), jnp.take_along_axis(weights, order, axis=1)


def summed_cross_entropy(model: TinyVLM, params, batch, *, text_noise=None, max_targets: int = 0):
  """Sum of the supervised targets' cross-entropies, and their count.

  max_targets 0: logits at every position. max_targets K > 0: the LM head only runs on
  the first K supervised positions of each row ([B, K, V] instead of [B, L, V]); the
  caller makes sure no row holds more (the loop checks this on the host).
  """
  inputs = dict(positions=batch["positions"], attention_mask=batch["attention_mask"], text_noise=text_noise)
  targets, weights = shifted_targets(batch["input_ids"], batch["loss_mask"])
  if not max_targets:
    logits, _ = model.apply({"params": params}, batch["input_ids"], batch["pixel_values"],
                            batch.get("cnn_pixel_values"), **inputs)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], targets)  # [B, L-1]
    return jnp.sum(jnp.where(weights, ce, 0.0)), jnp.sum(weights)
  hidden, _ = model.apply({"params": params}, batch["input_ids"], batch["pixel_values"],
                          batch.get("cnn_pixel_values"), hidden_only=True, **inputs)  # [B, L, D]
  index, valid = target_positions(weights, max_targets)  # [B, K]
  picked = jnp.take_along_axis(hidden[:, :-1], index[..., None], axis=1)  # [B, L-1, D] -> [B, K, D]
  logits = model.apply({"params": params}, picked, method="lm_logits").astype(jnp.float32)  # [B, K, V]
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.take_along_axis(targets, index, axis=1))
  return jnp.sum(jnp.where(valid, ce, 0.0)), jnp.sum(valid)
