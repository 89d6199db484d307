"""Data-parallel generation: a batch split over 4 fake CPU devices gives the single-device tokens."""

import json
import textwrap

from tinyvlm_jax.train.testing import run_with_devices

SCRIPT = textwrap.dedent("""
    import json, os
    import jax, numpy as np
    jax.config.update("jax_default_matmul_precision", "highest")
    from tinyvlm_jax.generate import VLMGenerator
    from tinyvlm_jax.models.tinyvlm import init_params
    from tinyvlm_jax.presets import model_config
    cfg = model_config("tiny")
    params = jax.tree.map(lambda p: p * 3.0, init_params(cfg, jax.random.key(0)))
    rng = np.random.default_rng(0)
    s, c = cfg.vision.image_size, cfg.cnn.image_size
    pixels = rng.uniform(-1, 1, (3, cfg.num_views, s, s, 3)).astype(np.float32)
    cnn = rng.normal(size=(3, c, c, 3)).astype(np.float32)
    prompts = [rng.integers(5, 400, 2).tolist()[:1] + [cfg.image_token_id] * cfg.num_visual_tokens
               + rng.integers(5, 400, n).tolist() for n in (1, 6, 3)]
    mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    sharded = VLMGenerator(cfg, params, stop_ids=(3, 4), pad_id=0, buckets=(64,), mesh=mesh)
    single = VLMGenerator(cfg, params, stop_ids=(3, 4), pad_id=0, buckets=(64,))
    a = sharded.generate(prompts, pixels, cnn, max_new_tokens=8)
    b = single.generate(prompts, pixels, cnn, max_new_tokens=8)
    print(json.dumps({"devices": jax.device_count(), "sharded": a, "single": b}))
""")


def test_data_parallel_generation_matches_one_device():
  r = run_with_devices(["-c", SCRIPT], 4, check=False)
  assert r.returncode == 0, r.stderr[-3000:]
  out = json.loads(r.stdout.strip().splitlines()[-1])
  assert out["devices"] == 4
  assert out["sharded"] == out["single"]
  assert len({tuple(x) for x in out["single"]}) > 1
