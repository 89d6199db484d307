"""The assembled TinyVLM: full-size parameter budget, visual-token splicing, variants."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tinyvlm_jax.models.tinyvlm import (TinyVLM, count_params, dummy_inputs, init_params, param_shapes,
                                        splice_visual_tokens)
from tinyvlm_jax.presets import model_config


def test_full_size_parameter_budget():
  """DESIGN 1 without allocating: 0.60-0.63 B in all, pooler 2.36 M, every tower present."""
  cfg = model_config("tinyvlm_0p6b")
  shapes = param_shapes(cfg)
  total = count_params(shapes)
  assert 0.60e9 <= total <= 0.63e9, total
  assert round(count_params(shapes["pooler"]) / 1e6, 2) == 2.36
  assert round(count_params(shapes["llm"]) / 1e6, 1) == 494.0
  assert round(count_params(shapes["cnn"]) / 1e6, 1) == 27.9
  assert round(count_params(shapes["vision"]) / 1e6, 1) == 86.1  # SigLIP-B/16-384 without its MAP head
  no_cnn = param_shapes(dataclasses.replace(cfg, use_cnn=False))
  assert set(no_cnn) == {"vision", "pooler", "connector", "llm"}


def test_splice_puts_visual_tokens_in_order_at_placeholders():
  ids = jnp.array([[1, 9, 9, 9, 2, 0], [9, 9, 9, 5, 6, 7], [1, 2, 3, 4, 5, 6]])
  text = jnp.zeros((3, 6, 2))
  visual = jnp.arange(3 * 3 * 2, dtype=jnp.float32).reshape(3, 3, 2) + 1
  out = np.asarray(splice_visual_tokens(ids, text, visual, image_token_id=9))
  np.testing.assert_array_equal(out[0, 1:4], np.asarray(visual[0]))
  np.testing.assert_array_equal(out[1, 0:3], np.asarray(visual[1]))
  assert not out[0, [0, 4, 5]].any() and not out[1, 3:].any()
  assert not out[2].any()  # a text-only row keeps its text embeddings


@pytest.mark.parametrize("variant", [dict(), dict(zoom=False), dict(pooler="none", use_cnn=False),
                                     dict(pooler="mean"), dict(feature_layer=1)])
def test_variants_produce_the_configured_visual_tokens(variant):
  cfg = dataclasses.replace(model_config("tiny"), **variant)
  params = init_params(cfg, jax.random.key(0))
  inputs = dummy_inputs(cfg, batch=2)
  model = TinyVLM(cfg)
  # Shapes first (no compute), then one compiled forward (op-by-op it took ~20 s per variant).
  visual = jax.eval_shape(lambda p: model.apply({"params": p}, inputs["pixel_values"], inputs["cnn_pixel_values"],
                                                method="encode_images"), params)
  assert visual.shape == (2, cfg.num_visual_tokens, cfg.llm.hidden_size)
  ids = inputs["input_ids"].at[:, 2:2 + cfg.num_visual_tokens].set(cfg.image_token_id)
  logits, _ = jax.jit(lambda p: model.apply({"params": p}, ids, inputs["pixel_values"], inputs["cnn_pixel_values"],
                                            positions=inputs["positions"],
                                            attention_mask=inputs["attention_mask"]))(params)
  assert logits.shape == ids.shape + (cfg.llm.vocab_size,)
  assert np.isfinite(np.asarray(logits)).all()


def test_logits_depend_on_every_view_and_the_cnn_image():
  cfg = model_config("tiny")
  params = init_params(cfg, jax.random.key(0))
  model = TinyVLM(cfg)
  rng = np.random.default_rng(0)
  px = jnp.asarray(rng.uniform(-1, 1, (1, cfg.num_views, cfg.vision.image_size, cfg.vision.image_size, 3)),
                   jnp.float32)
  cnn = jnp.asarray(rng.normal(size=(1, cfg.cnn.image_size, cfg.cnn.image_size, 3)), jnp.float32)
  encode_fn = jax.jit(lambda p, c: model.apply({"params": params}, p, c, method="encode_images"))
  encode = lambda p, c: np.asarray(encode_fn(p, c))
  base = encode(px, cnn)
  per_view = cfg.tokens_per_view
  for view in range(cfg.num_views):
    changed = encode(px.at[:, view].multiply(-1), cnn)
    diff = np.abs(changed - base).max(axis=-1)[0]
    start = cfg.num_cnn_tokens + view * per_view
    assert diff[start:start + per_view].min() > 0  # this view's tokens moved
    others = np.delete(diff[cfg.num_cnn_tokens:], np.s_[view * per_view:(view + 1) * per_view])
    assert others.max() == 0  # the other views' tokens did not
    assert (diff[:cfg.num_cnn_tokens].max() > 0) == (view == 0)  # the fuser reads the global view only
  assert np.abs(encode(px, -cnn) - base)[0, :cfg.num_cnn_tokens].min() > 0


def test_hidden_only_then_lm_logits_equals_logits():
  """Training takes hidden states and applies the LM head to supervised positions only."""
  cfg = model_config("tiny")
  params = init_params(cfg, jax.random.key(0))
  inputs = dummy_inputs(cfg, batch=2)
  inputs["input_ids"] = jax.random.randint(jax.random.key(1), inputs["input_ids"].shape, 0, 400)
  model = TinyVLM(cfg)
  forward = jax.jit(lambda p, x, hidden_only: model.apply({"params": p}, **x, hidden_only=hidden_only),
                    static_argnums=2)  # compiled: op by op it took ~25 s
  logits, _ = forward(params, inputs, False)
  hidden, _ = forward(params, inputs, True)
  picked = hidden[:, jnp.array([3, 7])]
  lm_logits = jax.jit(lambda p, h: model.apply({"params": p}, h, method="lm_logits"))
  np.testing.assert_allclose(lm_logits(params, picked), logits[:, jnp.array([3, 7])], atol=1e-5)
