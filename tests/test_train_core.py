"""Loss, NEFTune, optimiser (frozen parts, LR multipliers, schedules), accumulation, partition rules."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from tinyvlm_jax.models.tinyvlm import TinyVLM, init_params
from tinyvlm_jax.presets import model_config
from tinyvlm_jax.train import loss as loss_lib
from tinyvlm_jax.train import optimizer, sharding
from tinyvlm_jax.train import step as step_lib
from tinyvlm_jax.train.testing import random_batch

CFG = dataclasses.replace(model_config("tiny"), use_cnn=False)


@pytest.fixture(scope="module")
def params():
  return jax.device_get(init_params(CFG, jax.random.PRNGKey(0)))


@pytest.fixture(scope="module")
def batch():
  return random_batch(CFG, 4, seed=3, answer_len=5)


def test_loss_is_mean_cross_entropy_of_shifted_supervised_tokens(params, batch):
  model = TinyVLM(CFG)
  b = {k: jnp.asarray(v) for k, v in batch.items()}
  logits, _ = jax.jit(lambda p: model.apply({"params": p}, b["input_ids"], b["pixel_values"], positions=b["positions"],
                                            attention_mask=b["attention_mask"]))(params)
  logits = np.asarray(logits, np.float64)
  total, count = 0.0, 0
  for i in range(logits.shape[0]):
    for t in range(logits.shape[1] - 1):
      if batch["loss_mask"][i, t + 1]:  # logits at t predict token t+1
        row = logits[i, t]
        total += np.log(np.sum(np.exp(row - row.max()))) + row.max() - row[batch["input_ids"][i, t + 1]]
        count += 1
  fn = jax.jit(lambda p, k: loss_lib.summed_cross_entropy(model, p, b, max_targets=k), static_argnums=1)
  full_sum, full_n = fn(params, 0)
  head_sum, head_n = fn(params, 6)  # LM head on the first 6 supervised positions of each row (all of them)
  assert int(full_n) == int(head_n) == count == int(batch["loss_mask"][:, 1:].sum())
  assert abs(float(full_sum) - total) < 1e-3 and abs(float(head_sum) - total) < 1e-3
  cut_sum, cut_n = fn(params, 3)  # fewer slots than targets: only the first 3 per row count
  assert int(cut_n) == 3 * 4 and float(cut_sum) < float(full_sum)


def test_neftune_noise_scale_and_padding():
  mask = np.ones((3, 50), np.int32)
  mask[1, 20:] = 0
  mask[2, 5:] = 0
  noise = np.asarray(loss_lib.neftune_noise(jax.random.PRNGKey(1), jnp.asarray(mask), 64, 5.0))
  lengths = mask.sum(1)
  for i, n in enumerate(lengths):
    bound = 5.0 / np.sqrt(n * 64)
    real = noise[i, :n]
    assert np.abs(real).max() <= bound + 1e-7 and np.abs(real).max() > 0.95 * bound
    assert abs(np.abs(real).mean() - bound / 2) < 0.05 * bound  # U(-1, 1) * bound
    assert np.all(noise[i, n:] == 0)


def test_schedules():
  lin = optimizer.make_schedule("linear", 1e-5, 5e-6, 16_000)
  assert np.isclose(lin(0), 1e-5) and np.isclose(lin(8_000), 7.5e-6) and np.isclose(lin(16_000), 5e-6)
  warm = optimizer.make_schedule("linear", 1e-6, 0.0, 110, warmup_steps=10)
  assert np.isclose(warm(0), 0.0) and np.isclose(warm(10), 1e-6) and np.isclose(warm(60), 5e-7)
  const = optimizer.make_schedule("constant", 5e-7, 5e-7, 25_000)
  assert np.isclose(const(0), 5e-7) and np.isclose(const(24_999), 5e-7)
  with pytest.raises(ValueError, match="schedule.kind='cosin'"):
    optimizer.make_schedule("cosin", 1.0, 0.0, 10)


def _run(params, batch, *, trainable, frozen=(), lr_mults=None, accum=1, steps=1):
  schedule = optimizer.make_schedule("constant", 1e-3, 1e-3, 10)
  tx = optimizer.make_optimizer(params, trainable=trainable, frozen=frozen, schedule=schedule, lr_mults=lr_mults)
  cfg = step_lib.StepConfig(trainable=trainable, frozen=frozen, grad_accum_steps=accum, neftune_alpha=5.0,
                            max_targets=6)
  step = jax.jit(step_lib.make_train_step(TinyVLM(CFG), tx, cfg, schedule))
  state = step_lib.init_state(jax.tree.map(jnp.asarray, params), tx, seed=0)
  losses = []
  for _ in range(steps):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  return jax.device_get(state), losses


def test_frozen_parts_keep_bits_and_hold_no_state_and_lr_mults_scale(params, batch):
  trainable = ("pooler", "connector", "llm")
  frozen = (r"llm/embed_tokens/embedding",)
  state, losses = _run(params, batch, trainable=trainable, frozen=frozen, lr_mults={"connector": 3.0}, steps=2)
  before = traverse_util.flatten_dict(params, sep="/")
  after = traverse_util.flatten_dict(state.params, sep="/")
  for name, x in before.items():
    if name.startswith(("vision/", "llm/embed_tokens/")):
      assert np.array_equal(np.asarray(after[name]), x), name  # frozen: bit-identical
    elif name.endswith("kernel"):
      assert not np.array_equal(np.asarray(after[name]), x), name
  # AdamW moments exist for the trainable leaves only.
  mu_sizes = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim > 0) // 2
  train, _ = optimizer.split_trainable(params, optimizer.param_labels(params, trainable, frozen))
  assert mu_sizes == sum(x.size for x in jax.tree.leaves(train))
  # Adam's first steps move each weight by about lr * mult (two steps: 2e-3, times 3 for the connector).
  moved = lambda m, k: float(np.max(np.abs(np.asarray(after[f"{m}/{k}"]) - before[f"{m}/{k}"])))
  assert 5.5e-3 < moved("connector", "fc1/kernel") < 6.2e-3
  assert 1.8e-3 < moved("pooler", "conv/kernel") < 2.1e-3
  assert losses[1] < losses[0]


def test_gradient_accumulation_equals_one_big_batch(params):
  batch = random_batch(CFG, 8, seed=4, answer_len=4)
  one, loss_one = _run(params, batch, trainable=("pooler", "connector", "llm"), accum=1)
  four, loss_four = _run(params, batch, trainable=("pooler", "connector", "llm"), accum=4)
  assert abs(loss_one[0] - loss_four[0]) < 1e-5
  diff = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))), one.params, four.params)
  assert max(jax.tree.leaves(diff)) < 1e-5


def test_mesh_shape_and_partition_rules():
  assert sharding.mesh_shape({"data": -1, "fsdp": 4}, 8) == (2, 4, 1)
  assert sharding.mesh_shape({"data": 2, "fsdp": 2, "tensor": 2}, 8) == (2, 2, 2)
  with pytest.raises(ValueError, match="does not fit 8 devices"):
    sharding.mesh_shape({"data": 3, "fsdp": -1}, 8)
  with pytest.raises(ValueError, match=r"unknown axis name\(s\) \['model'\]"):
    sharding.mesh_shape({"model": 2}, 8)

  class FakeMesh:  # spec_for only reads the axis sizes
    shape = {"data": 2, "fsdp": 4, "tensor": 2}

  from tinyvlm_jax.train.config import DEFAULT_PARTITION_RULES as rules
  spec = lambda name, shape: tuple(sharding.spec_for(name, shape, rules, FakeMesh()))
  assert spec("llm/layers_3/mlp/up_proj/kernel", (896, 4864)) == ("fsdp", "tensor")
  assert spec("llm/layers_3/mlp/down_proj/kernel", (4864, 896)) == ("tensor", "fsdp")
  assert spec("llm/layers_0/self_attn/k_proj/bias", (128,)) == ("tensor",)
  assert spec("llm/embed_tokens/embedding", (151936, 896)) == (None, "fsdp")
  assert spec("llm/layers_0/self_attn/k_proj/kernel", (896, 3)) == ("fsdp", None)  # 3 does not split over 2
  assert spec("cnn/stages_0/layers_0/dwconv/kernel", (7, 7, 1, 96)) == (None, None, None, "fsdp")  # "fsdp" rule
  assert spec("llm/norm/scale", (6,)) == ()  # no dimension divides by 4: replicated
  with pytest.raises(ValueError, match="matches no partition rule"):
    sharding.spec_for("x/y", (4,), [(r"llm/.*", None)], FakeMesh())
