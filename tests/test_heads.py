"""ConvPooler, Connector, CrossAttentionFuser and the visual-token arithmetic of the presets."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tinyvlm_jax.models.heads import Connector, ConvPooler, CrossAttentionFuser, sincos_2d
from tinyvlm_jax.presets import model_config


def test_conv_pooler_at_init_is_2x2_average_pooling():
  cfg = model_config("tinyvlm_0p6b")
  g, d = cfg.vision.grid, cfg.vision.hidden_size
  x = jax.random.normal(jax.random.key(0), (2, g * g, d))
  pooler = ConvPooler(kind="conv", stride=cfg.pool_stride)
  params = pooler.init(jax.random.key(1), x)
  y = np.asarray(pooler.apply(params, x))
  s = cfg.pool_stride
  ref = np.asarray(x).reshape(2, g // s, s, g // s, s, d).mean(axis=(2, 4)).reshape(2, -1, d)
  assert y.shape == (2, cfg.tokens_per_view, d)
  np.testing.assert_allclose(y, ref, atol=1e-6)
  mean = ConvPooler(kind="mean", stride=s).apply({}, x)
  np.testing.assert_allclose(np.asarray(mean), ref, atol=1e-6)
  assert ConvPooler(kind="none").apply({}, x) is x


def test_conv_pooler_learns_off_identity():
  """The conv is a real parameter: a different kernel gives a different output."""
  x = jax.random.normal(jax.random.key(0), (1, 16, 8))
  pooler = ConvPooler(kind="conv")
  params = pooler.init(jax.random.key(1), x)
  bumped = jax.tree.map(lambda p: p + 0.1, params)
  assert not np.allclose(pooler.apply(params, x), pooler.apply(bumped, x))


def test_pooler_rejects_non_grid():
  with pytest.raises(ValueError, match="not a square grid"):
    ConvPooler().init(jax.random.key(0), jnp.ones((1, 15, 8)))


def test_head_parameter_counts_match_design():
  cfg = model_config("tinyvlm_0p6b")
  dv, dl, dc = cfg.vision.hidden_size, cfg.llm.hidden_size, cfg.cnn.hidden_sizes[-1]
  count = lambda tree: sum(x.size for x in jax.tree.leaves(tree))
  pooler = jax.eval_shape(ConvPooler().init, jax.random.key(0), jnp.ones((1, cfg.vision.num_patches, dv)))
  connector = jax.eval_shape(Connector(dl).init, jax.random.key(0), jnp.ones((1, dv)))
  fuser = jax.eval_shape(CrossAttentionFuser(dl).init, jax.random.key(0), jnp.ones((1, cfg.cnn.num_tokens, dc)),
                         jnp.ones((1, cfg.vision.num_patches, dv)))
  assert round(count(pooler) / 1e6, 2) == 2.36
  assert round(count(connector) / 1e6, 2) == 1.49
  assert round(count(fuser) / 1e6, 2) == 1.38


def test_fuser_matches_equations():
  """out = softmax((Q+PEq)(KV+PEkv)^T / sqrt(d)) KV, written out in numpy."""
  cnn = jax.random.normal(jax.random.key(0), (2, 4, 6))
  vit = jax.random.normal(jax.random.key(1), (2, 16, 5))
  fuser = CrossAttentionFuser(width=8)
  params = fuser.init(jax.random.key(2), cnn, vit)
  out = np.asarray(fuser.apply(params, cnn, vit))
  p = jax.tree.map(np.asarray, params["params"])
  q = np.asarray(cnn) @ p["q_proj"]["kernel"] + p["q_proj"]["bias"]
  kv = np.asarray(vit) @ p["kv_proj"]["kernel"] + p["kv_proj"]["bias"]
  logits = (q + sincos_2d(2, 8, frame=4)) @ np.swapaxes(kv + sincos_2d(4, 8, frame=4), 1, 2) / np.sqrt(8)
  attn = np.exp(logits - logits.max(-1, keepdims=True))
  attn /= attn.sum(-1, keepdims=True)
  np.testing.assert_allclose(out, attn @ kv, atol=1e-5)


def test_sincos_positions_align_across_grids():
  """A 7x7 CNN cell is closest (in PE space) to the 24x24 ViT patches that cover the same region."""
  cfg = model_config("tinyvlm_0p6b")
  cnn_pe = sincos_2d(cfg.cnn.grid, cfg.llm.hidden_size, frame=cfg.vision.grid)
  vit_pe = sincos_2d(cfg.vision.grid, cfg.llm.hidden_size, frame=cfg.vision.grid)
  nearest = np.argmax(cnn_pe @ vit_pe.T, axis=1)
  g, c = cfg.vision.grid, cfg.cnn.grid
  for cell, patch in enumerate(nearest):
    ci, cj = divmod(cell, c)
    pi, pj = divmod(int(patch), g)
    assert abs((pi + 0.5) / g - (ci + 0.5) / c) <= 1 / c / 2 + 1 / g
    assert abs((pj + 0.5) / g - (cj + 0.5) / c) <= 1 / c / 2 + 1 / g


def test_visual_token_counts_and_kv_cache_match_paper_tables():
  cfg = model_config("tinyvlm_0p6b")
  assert cfg.num_visual_tokens == 769
  assert round(cfg.visual_kv_cache_bytes() / 1e6, 1) == 9.4
  assert cfg.kv_cache_bytes_per_token() == 12288
  variants = {  # paper Tables 2 and 4: (tokens, MB)
      (False, "none", False): (576, 7.1),
      (True, "none", False): (2880, 35.4),
      (True, "conv", False): (720, 8.8),
      (True, "conv", True): (769, 9.4),
  }
  for (zoom, pooler, cnn), (tokens, mb) in variants.items():
    v = dataclasses.replace(cfg, zoom=zoom, pooler=pooler, use_cnn=cnn)
    assert v.num_visual_tokens == tokens
    assert round(v.visual_kv_cache_bytes() / 1e6, 1) == mb
  # SigLIP at 224 / 384 / 512: 49, 144, 256 pooled tokens per view.
  for size, per_view in ((224, 49), (384, 144), (512, 256)):
    v = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, image_size=size))
    assert v.tokens_per_view == per_view
