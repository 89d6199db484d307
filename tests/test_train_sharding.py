"""The train step on 8 fake CPU devices equals the 1-device step; weights really are split.

The 8-device part runs in a subprocess (`python tests/test_train_sharding.py worker`) with
XLA_FLAGS set before jax is imported.
"""

import json
import sys

TRAINABLE = ("vision", "pooler", "connector", "llm", "fuser")  # the CNN stays frozen
# One mesh that splits over every axis (test_train_loop also trains on data=2, fsdp=4); each mesh
# here costs about 25 s of compilation.
MESHES = {"data2_fsdp2_tensor2": dict(data=2, fsdp=2, tensor=2)}


def _worker():
  import jax
  import numpy as np
  jax.config.update("jax_default_matmul_precision", "highest")
  from tinyvlm_jax.models.tinyvlm import TinyVLM, init_params
  from tinyvlm_jax.presets import model_config
  from tinyvlm_jax.train import config as train_config
  from tinyvlm_jax.train import optimizer, sharding, step as step_lib
  from tinyvlm_jax.train.testing import random_batch

  assert jax.device_count() == 8, jax.devices()
  cfg = model_config("tiny")
  params = jax.device_get(init_params(cfg, jax.random.PRNGKey(0)))
  batch = random_batch(cfg, 16, seed=1)
  schedule = optimizer.make_schedule("linear", 1e-3, 1e-4, 10)
  tx = optimizer.make_optimizer(params, trainable=TRAINABLE, schedule=schedule, lr_mults={"fuser": 3.0})
  step_cfg = step_lib.StepConfig(trainable=TRAINABLE, grad_accum_steps=2, neftune_alpha=5.0, max_targets=8)
  step_fn = step_lib.make_train_step(TinyVLM(cfg), tx, step_cfg, schedule)
  rules = train_config.DEFAULT_PARTITION_RULES

  def run(mesh):
    specs = sharding.param_specs(params, rules, mesh)
    shardings = step_lib.state_shardings(mesh, specs, tx, params)
    state = step_lib.create_sharded_state(params, tx, 0, shardings)
    train = step_lib.jit_train_step(step_fn, mesh, shardings, batch)
    state, metrics = train(state, sharding.global_batch(mesh, batch))
    return state, float(metrics["loss"])

  ref_state, ref_loss = run(sharding.make_mesh(dict(data=1), devices=jax.devices()[:1]))
  ref = jax.device_get(ref_state)
  out = {"ref_loss": ref_loss, "meshes": {}}
  for name, axes in MESHES.items():
    mesh = sharding.make_mesh(axes)
    state, loss = run(mesh)
    diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
                         jax.device_get(state.params), ref.params)
    emb = state.params["llm"]["embed_tokens"]["embedding"]
    out["meshes"][name] = {
        "loss": loss,
        "max_param_diff": max(jax.tree.leaves(diffs)),
        "worst": jax.tree_util.keystr(max(jax.tree_util.tree_flatten_with_path(diffs)[0], key=lambda kv: kv[1])[0]),
        "moved": float(np.max(np.abs(np.asarray(ref.params["llm"]["embed_tokens"]["embedding"])
                                     - params["llm"]["embed_tokens"]["embedding"]))),
        "frozen_identical": all(np.array_equal(a, b) for a, b in zip(
            jax.tree.leaves(jax.device_get(state.params["cnn"])), jax.tree.leaves(params["cnn"]))),
        "largest": [int(np.prod(emb.shape)), int(np.prod(emb.addressable_shards[0].data.shape))],
        "largest_is_embedding": max(int(np.prod(x.shape)) for x in jax.tree.leaves(params)) == emb.size,
    }
  print("RESULT " + json.dumps(out))


def test_sharded_step_matches_one_device():
  from tinyvlm_jax.train.testing import run_with_devices
  proc = run_with_devices([__file__, "worker"], 8)
  line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))
  out = json.loads(line[len("RESULT "):])
  for name, r in out["meshes"].items():
    assert abs(r["loss"] - out["ref_loss"]) < 1e-5, (name, r, out["ref_loss"])
    assert r["max_param_diff"] < 1e-5, (name, r)
    assert r["moved"] > 1e-4, (name, r)  # the params compared did change
    assert r["frozen_identical"], name
    assert r["largest_is_embedding"]
  total, shard = out["meshes"]["data2_fsdp2_tensor2"]["largest"]
  assert shard * 2 == total, out["meshes"]["data2_fsdp2_tensor2"]  # the embedding [V, D] splits D over fsdp


if __name__ == "__main__" and sys.argv[1:] == ["worker"]:
  _worker()
