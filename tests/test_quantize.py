"""Weight-only int8/int4: error bounds, packing, CPU kernels against XLA, quantized TinyVLM and generation."""

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tinyvlm_jax import cpu_kernels
from tinyvlm_jax import quantize as q
from tinyvlm_jax.generate import LMDecoder, Sampling, VLMGenerator
from tinyvlm_jax.models.convnext import ConvNextV2
from tinyvlm_jax.models.qwen2 import Qwen2ForCausalLM
from tinyvlm_jax.models.tinyvlm import TinyVLM, init_params, param_shapes
from tinyvlm_jax.presets import model_config

STOP = (3, 4)
PAD = 0


def test_int8_per_channel_error_is_at_most_half_a_step():
  w = np.random.default_rng(0).normal(size=(24, 96)).astype(np.float32) * np.linspace(0.1, 3, 24)[:, None]
  qk, scale = q.quantize_int8(w)
  assert qk.dtype == np.int8 and qk.shape == (3, 12, 8, 8) and scale.shape == (24,)
  back = np.asarray(q.dequantize(jnp.asarray(qk), jnp.asarray(scale)))
  err = np.abs(back - w).max(axis=1)
  assert np.all(err <= scale / 2 * (1 + 1e-5)), (err / scale).max()
  np.testing.assert_allclose(scale, np.abs(w).max(axis=1) / 127, rtol=1e-6)  # one step per output channel
  assert (err / scale).max() > 0.4  # the bound is tight, not vacuous


def test_int4_packing_round_trip_and_group_error():
  rng = np.random.default_rng(1)
  ints = rng.integers(-8, 8, (16, 64))
  packed = q.pack_int4(ints)
  assert packed.dtype == np.uint8 and packed.shape == (2, 2, 8, 16)  # two 4-bit values per byte
  np.testing.assert_array_equal(q.unpack_int4(packed), ints)
  np.testing.assert_array_equal(np.asarray(q.unpack_int4(jnp.asarray(packed))), ints)
  np.testing.assert_array_equal(q.untile_int8(q.tile_int8(ints.astype(np.int8))), ints)
  w = rng.normal(size=(16, 128)).astype(np.float32)
  pk, scale = q.quantize_int4(w, 32)
  assert scale.shape == (16, 4) and scale.dtype == jnp.bfloat16
  # bfloat16 scales rounded up: never below the group's max / 7, and less than 2^-7 above it
  exact = np.abs(w).reshape(16, 4, 32).max(axis=2) / 7
  assert np.all(scale.astype(np.float32) >= exact) and np.all(scale.astype(np.float32) < exact * (1 + 2 ** -7))
  back = np.asarray(q.dequantize(jnp.asarray(pk), jnp.asarray(scale)))
  step = np.repeat(scale.astype(np.float32), 32, axis=1)
  assert np.all(np.abs(back - w) <= step / 2 * (1 + 1e-5))
  assert np.abs(np.rint(w / step)).max() == 7  # every group's largest weight still reaches q = +-7


@pytest.mark.parametrize("mode", ["int8", "int4_g32"])
def test_quantized_patch_conv_equals_the_conv_with_its_dequantized_kernel(mode):
  """QuantPatchConv = nn.Conv(kernel = stride, VALID) with the kernel that quantize_params packed: the
  patches are flattened in the conv kernel's [ph, pw, C] order, and a partial patch is dropped."""
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.normal(size=(2, 13, 9, 8)).astype(np.float32))  # 13 = 3 * 4 + 1: one row dropped
  conv = nn.Conv(16, (4, 2), strides=(4, 2), padding="VALID")
  params = {"conv": {"kernel": rng.normal(size=(4, 2, 8, 16)).astype(np.float32),
                     "bias": rng.normal(size=(16,)).astype(np.float32)}}
  packed = q._quantize_tree(params, q.parse_mode(mode), (), embeddings=False)["conv"]
  assert set(packed) == {"qkernel", "scale", "bias"}
  kernel = q.dequantize(jnp.asarray(packed["qkernel"]), jnp.asarray(packed["scale"])).T.reshape(4, 2, 8, 16)
  want = conv.apply({"params": {"kernel": kernel, "bias": params["conv"]["bias"]}}, x)
  got = q.QuantPatchConv(16, (4, 2), mode).apply({"params": packed}, x)
  assert got.shape == want.shape == (2, 3, 4, 16)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)
  # and the quantized conv is close to the float one (int8: within 2% of the largest output)
  ref = conv.apply({"params": params["conv"]}, x)
  assert float(jnp.abs(got - ref).max() / jnp.abs(ref).max()) < (0.02 if mode == "int8" else 0.3)


def test_bad_mode_and_shapes_are_named():
  with pytest.raises(ValueError, match="int3"):
    q.parse_mode("int3")
  with pytest.raises(ValueError, match="layer_x.*K=40"):
    q.quantize_int8(np.ones((8, 40), np.float32), "layer_x")
  assert q.parse_mode("int4") == q.QuantMode(4, 128) and q.parse_mode("int4_g32").group_for(64) == 32


@pytest.mark.parametrize("mode", ["int8", "int4", "int4_g64"])
@pytest.mark.parametrize("rows", [1, 3, 6, 9, 11, 40])  # GEMV kernel (<= 16 rows: blocks of 4 and 1-3) and dequantize + dot
def test_cpu_kernels_equal_the_xla_path(mode, rows, monkeypatch):
  if not cpu_kernels.available():
    pytest.skip("CPU kernels unavailable here (no AVX2/FMA or no compiler)")
  rng = np.random.default_rng(2)
  n, k = 136, 256
  w = rng.normal(size=(n, k)).astype(np.float32)
  mode_ = q.parse_mode(mode)
  qk, scale = q.quantize_int8(w) if mode_.bits == 8 else q.quantize_int4(w, mode_.group_size)
  x = rng.normal(size=(rows, k)).astype(np.float32)
  x[0, :64] *= 1e-3  # a group of small inputs: the int4 GEMV scales x per group
  want = x @ np.asarray(q.dequantize(jnp.asarray(qk), jnp.asarray(scale))).T
  got = np.asarray(jax.jit(q.quantized_matmul)(x, qk, scale))
  # The int4 GEMV rounds each group of x to int16: within 1.5e-5 of the group's largest input.
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
  if rows <= cpu_kernels.GEMV_MAX_ROWS:  # the GEMV gives a row the same bits alone as in a batch
    alone = [np.asarray(jax.jit(q.quantized_matmul)(x[i:i + 1], qk, scale)) for i in range(rows)]
    np.testing.assert_array_equal(got, np.concatenate(alone))
  bad = x.copy()
  bad[-1, 5] = np.nan  # a non-finite input gives NaN outputs in its row only, as a float product does
  got = np.asarray(jax.jit(q.quantized_matmul)(bad, qk, scale))
  assert np.isnan(got[-1]).all() and np.isfinite(got[:-1]).all()
  monkeypatch.setattr(cpu_kernels, "available", lambda: False)
  xla = np.asarray(jax.jit(q.quantized_matmul)(x, qk, scale))
  np.testing.assert_allclose(xla, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("mode", ["int8", "int4_g64"])
@pytest.mark.parametrize("rows", [1, 6, 40])
def test_one_call_for_several_weights_equals_a_call_each(mode, rows):
  """quantized_matmuls (q, k and v in one kernel call) gives each weight the bits of its own call; the
  weights of one call must share K (and the int4 group size)."""
  if not cpu_kernels.available():
    pytest.skip("CPU kernels unavailable here (no AVX2/FMA or no compiler)")
  rng = np.random.default_rng(3)
  mode_ = q.parse_mode(mode)
  quant = (lambda w: q.quantize_int8(w)) if mode_.bits == 8 else (lambda w: q.quantize_int4(w, mode_.group_size))
  # the thread blocks over the 104 rows taken together straddle the borders of the weights
  weights = [tuple(map(jnp.asarray, quant(rng.normal(size=(n, 128)).astype(np.float32)))) for n in (64, 16, 24)]
  x = rng.normal(size=(rows, 128)).astype(np.float32)
  got = jax.jit(q.quantized_matmuls)(x, weights)
  assert [g.shape for g in got] == [(rows, 64), (rows, 16), (rows, 24)]
  for g, (qk, scale) in zip(got, weights):
    np.testing.assert_array_equal(np.asarray(g), np.asarray(jax.jit(q.quantized_matmul)(x, qk, scale)))
  other_k = tuple(map(jnp.asarray, quant(rng.normal(size=(8, 256)).astype(np.float32))))
  with pytest.raises(ValueError, match="weight 1 .* one kind, K and group size"):
    q.quantized_matmuls(x, [weights[0], other_k])
  if mode_.bits == 4:  # same K, another group size: refused, and the kernel itself names the weight
    other_g = tuple(map(jnp.asarray, q.quantize_int4(rng.normal(size=(8, 128)).astype(np.float32), 32)))
    with pytest.raises(ValueError, match="weight 1 .* one kind, K and group size"):
      q.quantized_matmuls(x, [weights[0], other_g])
    call = lambda x, *ops: cpu_kernels.call_results("gemv_i4", [(1, 64), (1, 8)], x, *ops)
    with pytest.raises(Exception, match="weight 1: every weight of one call must have the same K and scale groups"):
      jax.block_until_ready(jax.jit(call)(x[:1], *weights[0], *other_g))


@pytest.fixture(scope="module")
def tiny_vlm():
  cfg = model_config("tiny")
  return cfg, init_params(cfg, jax.random.key(0))


def _vlm_inputs(cfg, n=2, text=6, seed=0):
  rng = np.random.default_rng(seed)
  s, c = cfg.vision.image_size, cfg.cnn.image_size
  pixels = rng.uniform(-1, 1, (n, cfg.num_views, s, s, 3)).astype(np.float32)
  cnn = rng.normal(size=(n, c, c, 3)).astype(np.float32)
  prompts = [[7] + [cfg.image_token_id] * cfg.num_visual_tokens + rng.integers(5, 400, text).tolist()
             for _ in range(n)]
  return prompts, pixels, cnn


@pytest.mark.parametrize("mode,max_rel", [("int8", 0.02), ("int4_g32", 0.3)])
def test_quantized_tiny_vlm_logits_close_to_float32(tiny_vlm, mode, max_rel):
  cfg, params = tiny_vlm
  prompts, pixels, cnn = _vlm_inputs(cfg)
  ids = jnp.asarray(prompts, jnp.int32)
  kw = dict(positions=jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape), attention_mask=jnp.ones_like(ids))
  logits = lambda cfg, params: jax.jit(TinyVLM(cfg).apply)({"params": params}, ids, pixels, cnn, **kw)[0]
  ref = logits(cfg, params)
  qparams, qcfg = q.quantize_params(params, cfg, mode), q.quantized_config(cfg, mode)
  out = logits(qcfg, qparams)
  rel = float(jnp.abs(out - ref).max() / jnp.abs(ref).max())
  assert 0 < rel <= max_rel, rel  # measured: int8 0.007, int4 (group 32) 0.19
  # quantized towers hold int weights; norms, heads and CNN layers too narrow to pack are untouched
  assert qparams["llm"]["layers_0"]["mlp"]["up_proj"]["qkernel"].dtype in (np.int8, np.uint8)
  assert qparams["vision"]["encoder"]["layers_0"]["mlp"]["fc1"]["qkernel"].dtype in (np.int8, np.uint8)
  cnn, qcnn = params["cnn"]["stages_3"]["layers_0"], qparams["cnn"]["stages_3"]["layers_0"]
  assert qcnn["pwconv1"]["qkernel"].dtype in (np.int8, np.uint8) and qcnn["pwconv2"]["bias"] is cnn["pwconv2"]["bias"]
  assert qparams["cnn"]["stages_0"]["layers_0"]["pwconv1"] is params["cnn"]["stages_0"]["layers_0"]["pwconv1"]  # K=8
  assert "qkernel" in qparams["cnn"]["stages_0"]["layers_0"]["pwconv2"]  # [8, 32] packs
  assert qcnn["dwconv"]["kernel"] is cnn["dwconv"]["kernel"]
  # the heads and the patchify convs too, where they pack: the ConvNeXt stem's 4x4x3 = 48 inputs do not
  for where in [("connector", "fc2"), ("fuser", "kv_proj"), ("pooler", "conv"),
                ("vision", "embeddings", "patch_embedding"), ("cnn", "stages_2", "downsampling_conv")]:
    assert "qkernel" in functools.reduce(dict.get, where, qparams), where
  assert qparams["cnn"]["embeddings"]["patch_embeddings"] is params["cnn"]["embeddings"]["patch_embeddings"]
  # exactly the params the quantized modules declare
  shapes = lambda tree: jax.tree.map(lambda x: (x.shape, jnp.dtype(x.dtype)), tree)
  assert shapes(qparams) == shapes(param_shapes(qcfg))
  assert q.weight_bytes(qparams["llm"]) < 0.35 * q.weight_bytes(params["llm"])


def test_full_size_weight_bytes():
  """The quantized full-size model's weights, from shapes alone: int4 (group 128) near the
  paper's 300 MB (every Dense layer and patch conv packed, bfloat16 group scales)."""
  cfg = model_config("tinyvlm_0p6b")
  int4_mb = q.weight_bytes(param_shapes(q.quantized_config(cfg, "int4"))) / 1e6
  # float32: 2453 MB; 357 with float32 scales, heads and patch convs; 347 with bfloat16 scales alone
  assert 320 < int4_mb < 323, int4_mb
  # quantize_params packs the full-size CNN into exactly the params its quantized module declares
  # (int4 groups of 128 do not divide stage 2's 192 inputs: that layer stays float32)
  def cnn_shapes(mode):
    c = dataclasses.replace(cfg.cnn, quantization=mode)
    pixels = jnp.zeros((1, c.image_size, c.image_size, c.num_channels))
    return jax.eval_shape(lambda k: ConvNextV2(c).init(k, pixels)["params"], jax.random.key(0))
  rng = np.random.default_rng(0)
  cnn = jax.tree.map(lambda s: rng.standard_normal(s.shape, np.float32) * np.float32(0.02), cnn_shapes("none"))
  for mode in ("int8", "int4", "int4_g64"):
    got = jax.tree.map(lambda x: (x.shape, x.dtype), q.quantize_params(cnn, cfg.cnn, mode))
    assert got == jax.tree.map(lambda x: (x.shape, x.dtype), cnn_shapes(mode)), mode
  assert "kernel" in q.quantize_params(cnn, cfg.cnn, "int4")["stages_1"]["layers_0"]["pwconv1"]


def test_quantized_greedy_decoding_agrees_with_float32():
  cfg = model_config("tiny").llm
  model = Qwen2ForCausalLM(cfg)
  ids0 = jnp.zeros((1, 4), jnp.int32)
  params = model.init(jax.random.key(1), ids0, positions=ids0, attention_mask=jnp.ones_like(ids0))["params"]
  # a larger (tied) embedding: peaky logits, so greedy paths are not near-ties
  params = {**params, "embed_tokens": {"embedding": params["embed_tokens"]["embedding"] * 10.0}}
  prompts = jnp.asarray(np.random.default_rng(3).integers(5, cfg.vocab_size, (3, 10)), jnp.int32)
  mask = jnp.ones_like(prompts)

  def greedy(cfg, params):
    dec = LMDecoder(cfg, stop_ids=(), pad_id=PAD)
    embeds = dec.model.apply({"params": params}, prompts, method="embed")
    *_, tokens = dec.generate(params, embeds, mask, max_new_tokens=16)
    return np.asarray(tokens)

  ref = greedy(cfg, params)
  got = greedy(q.quantized_config(cfg, "int8"), q.quantize_params(params, cfg, "int8"))
  assert len({tuple(r) for r in ref}) == 3  # three different continuations
  np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_prefill_holds_one_layer_of_dequantized_weights(mode):
  """On CPU a prefill dequantizes each weight only once its input exists, so its temp buffers hold
  about one layer's float32 weights. (XLA used to run every dequantization of the program first,
  as they depend on parameters alone: all of the model's float32 weights alive at once.)"""
  if not cpu_kernels.available():
    pytest.skip("CPU kernels unavailable here (no AVX2/FMA or no compiler)")
  cfg = dataclasses.replace(model_config("tiny").llm, num_hidden_layers=8)
  model = Qwen2ForCausalLM(cfg)
  ids0 = jnp.zeros((1, 4), jnp.int32)
  params = model.init(jax.random.key(1), ids0, positions=ids0, attention_mask=jnp.ones_like(ids0))["params"]
  qparams = q.quantize_params(params, cfg, mode)
  layer_bytes = [4 * math.prod(x.shape) for path, x in jax.tree_util.tree_leaves_with_path(params)
                 if "layers_" in jax.tree_util.keystr(path) and x.ndim == 2]
  dec = LMDecoder(q.quantized_config(cfg, mode), stop_ids=(), pad_id=PAD)
  length = 48
  embeds = jax.ShapeDtypeStruct((1, length, cfg.hidden_size), jnp.float32)
  mask = jax.ShapeDtypeStruct((1, length), jnp.int32)
  compiled = dec._prefill.lower(qparams, embeds, mask, jax.random.key(0), max_new=4, sampling=Sampling()).compile()
  temp = compiled.memory_analysis().temp_size_in_bytes
  assert temp < sum(layer_bytes) / 3, (temp, sum(layer_bytes))


def test_vlm_generator_with_int8_model_matches_float32(tiny_vlm):
  cfg, params = tiny_vlm
  prompts, pixels, cnn = _vlm_inputs(cfg, n=2)
  ref = VLMGenerator(cfg, params, stop_ids=STOP, pad_id=PAD, buckets=(64,))
  gen = VLMGenerator(q.quantized_config(cfg, "int8"), q.quantize_params(params, cfg, "int8"), stop_ids=STOP,
                     pad_id=PAD, buckets=(64,))
  want = ref.generate(prompts, pixels, cnn, max_new_tokens=8)
  got = gen.generate(prompts, pixels, cnn, max_new_tokens=8)
  assert got == want and sum(map(len, got)) > 4
