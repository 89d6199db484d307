"""matmul_dtype bfloat16: a prompt's matmuls take bfloat16 operands (float32 sums), decode steps stay float32."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tinyvlm_jax import cpu_kernels
from tinyvlm_jax import quantize as q
from tinyvlm_jax.generate import LMDecoder, Sampling, VLMGenerator
from tinyvlm_jax.models.qwen2 import Qwen2ForCausalLM
from tinyvlm_jax.models.tinyvlm import init_params
from tinyvlm_jax.presets import model_config
from tinyvlm_jax.serving import with_matmul_dtype


def test_bfloat16_after_rounds_as_xla_converts():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(64, 40)).astype(np.float32) * np.float32(1e3)
  bits = x.view(np.uint32)
  bits[0, :8] = (bits[0, :8] & 0xFFFF0000) | 0x8000  # exact ties between two bfloat16 values
  bits[1, :8] = (bits[1, :8] & 0xFFFF0000) | 0x7FFF
  x[2, :4] = [np.inf, -np.inf, 0.0, -0.0]
  x[2, 4] = np.float32(3.3895e38)  # rounds up to inf
  x[3, :2] = np.nan
  after = jnp.ones((3,), jnp.float32)
  got = np.asarray(jax.jit(cpu_kernels.bfloat16_after)(after, x))
  want = np.asarray(jnp.asarray(x).astype(jnp.bfloat16))
  assert got.dtype == want.dtype
  nan = np.isnan(x)
  assert np.isnan(got.astype(np.float32)[nan]).all()
  np.testing.assert_array_equal(got.view(np.uint16)[~nan], want.view(np.uint16)[~nan])


def test_bfloat16_matmul_has_the_converts_gradient():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(24, 32)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(32, 8)), jnp.float32)
  dn = (((1,), (0,)), ((), ()))
  dot = cpu_kernels.matmul_dot_general("bfloat16")
  ref = lambda x, w: jax.lax.dot_general(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), dn,
                                         preferred_element_type=jnp.float32)
  loss = lambda f: lambda x, w: jnp.sum(jnp.sin(f(x, w)))
  np.testing.assert_array_equal(np.asarray(jax.jit(lambda x, w: dot(x, w, dn))(x, w)), np.asarray(jax.jit(ref)(x, w)))
  got = jax.jit(jax.grad(loss(lambda x, w: dot(x, w, dn)), argnums=(0, 1)))(x, w)
  want = jax.jit(jax.grad(loss(ref), argnums=(0, 1)))(x, w)
  for g, h in zip(got, want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(h), rtol=1e-6, atol=1e-6)


def test_bad_matmul_dtype_is_named():
  with pytest.raises(ValueError, match="matmul_dtype must be one of float32, bfloat16, got 'float16'"):
    with_matmul_dtype(model_config("tiny"), "float16")


@pytest.fixture(scope="module")
def llm():
  cfg = dataclasses.replace(model_config("tiny").llm, num_hidden_layers=6)
  ids0 = jnp.zeros((1, 4), jnp.int32)
  params = Qwen2ForCausalLM(cfg).init(jax.random.key(1), ids0, positions=ids0, attention_mask=jnp.ones_like(ids0))
  params = params["params"]
  # a larger (tied) embedding: peaky logits, so greedy paths are not near-ties
  return cfg, {**params, "embed_tokens": {"embedding": params["embed_tokens"]["embedding"] * 10.0}}


def _forward(cfg, params, ids):  # -> logits [B, L, V]
  positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
  return Qwen2ForCausalLM(cfg).apply({"params": params}, ids, positions=positions, attention_mask=jnp.ones_like(ids))[0]


@pytest.mark.parametrize("mode", ["none", "int8"])
def test_prompt_matmuls_round_to_bfloat16_and_decoding_agrees(llm, mode):
  cfg, params = llm
  cfg, params = q.quantized_config(cfg, mode), q.quantize_params(params, cfg, mode)
  bf16 = dataclasses.replace(cfg, matmul_dtype="bfloat16")
  ids = jnp.asarray(np.random.default_rng(1).integers(5, cfg.vocab_size, (2, 24)), jnp.int32)
  ref, got = np.asarray(_forward(cfg, params, ids)), np.asarray(_forward(bf16, params, ids))
  # bfloat16 operands (8 significant bits): a small difference, but a difference
  err = np.abs(got - ref).max() / np.abs(ref).max()
  assert 1e-5 < err < 3e-2, err
  # a row that fits a decode step's GEMV keeps float32 products: the same logits as float32
  np.testing.assert_array_equal(np.asarray(_forward(bf16, params, ids[:1, :1])),
                                np.asarray(_forward(cfg, params, ids[:1, :1])))

  def greedy(c):
    dec = LMDecoder(c, stop_ids=(), pad_id=0)
    embeds = dec.model.apply({"params": params}, ids[:, :10], method="embed")
    *_, tokens = dec.generate(params, embeds, jnp.ones((2, 10), jnp.int32), max_new_tokens=12)
    return np.asarray(tokens)
  np.testing.assert_array_equal(greedy(bf16), greedy(cfg))


def test_bfloat16_prefill_converts_one_layer_at_a_time(llm):
  """The float32 weights are converted to bfloat16 only once their input exists (XLA's own converts
  all ran first), so a prefill's temp buffers hold about one layer's bfloat16 weights."""
  if not cpu_kernels.available():
    pytest.skip("CPU kernels unavailable here (no AVX2/FMA or no compiler)")
  cfg, params = llm
  layer_bytes = sum(2 * x.size for path, x in jax.tree_util.tree_leaves_with_path(params)
                    if "layers_" in jax.tree_util.keystr(path) and x.ndim == 2)
  dec = LMDecoder(dataclasses.replace(cfg, matmul_dtype="bfloat16"), stop_ids=(), pad_id=0)
  embeds = jax.ShapeDtypeStruct((1, 48, cfg.hidden_size), jnp.float32)
  mask = jax.ShapeDtypeStruct((1, 48), jnp.int32)
  compiled = dec._prefill.lower(params, embeds, mask, jax.random.key(0), max_new=4, sampling=Sampling()).compile()
  assert compiled.memory_analysis().temp_size_in_bytes < layer_bytes / 2


def test_vlm_generator_with_bfloat16_matmuls():
  cfg = model_config("tiny")
  params = init_params(cfg, jax.random.key(0))
  bf16 = with_matmul_dtype(cfg, "bfloat16")
  assert bf16.vision.matmul_dtype == bf16.llm.matmul_dtype == "bfloat16" and cfg.llm.matmul_dtype == "float32"
  rng = np.random.default_rng(0)
  s, c = cfg.vision.image_size, cfg.cnn.image_size
  pixels = rng.uniform(-1, 1, (2, cfg.num_views, s, s, 3)).astype(np.float32)
  cnn = rng.normal(size=(2, c, c, 3)).astype(np.float32)
  ref = VLMGenerator(cfg, params, stop_ids=(), pad_id=0)
  gen = VLMGenerator(bf16, params, stop_ids=(), pad_id=0)
  want, got = np.asarray(ref._encode(params, pixels, cnn)), np.asarray(gen._encode(params, pixels, cnn))
  err = np.abs(got - want).max() / np.abs(want).max()
  assert 1e-5 < err < 3e-2, err
