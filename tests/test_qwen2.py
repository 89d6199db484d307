"""Qwen2 decoder: logits parity with transformers, KV cache, weight mapping both ways."""

import dataclasses
import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from tinyvlm_jax import cpu_kernels
from tinyvlm_jax.convert import qwen2 as convert
from tinyvlm_jax.convert.mapping import CheckpointMismatchError, TRANSFORMS, flatten, load_state_dict
from tinyvlm_jax.models import qwen2
from tinyvlm_jax.models.qwen2 import Qwen2ForCausalLM, init_cache
from tinyvlm_jax.presets import model_config

TOL = 1e-5


def _hf_model(cfg, seed=0):
  """A random fp32 transformers Qwen2ForCausalLM with eager attention.

  HF initialises norms to 1 and biases to 0 with std 0.02 elsewhere; every parameter is
  redrawn here so that each one, biases and norm scales included, moves the logits.
  """
  torch.manual_seed(seed)
  hf = transformers.AutoModelForCausalLM.from_config(
      convert.to_hf_config(cfg), attn_implementation="eager", dtype=torch.float32).eval()
  with torch.no_grad():
    for name, p in hf.named_parameters():
      p.copy_(1 + 0.2 * torch.randn_like(p) if name.endswith("norm.weight") else 0.15 * torch.randn_like(p))
  return hf


@functools.lru_cache(maxsize=None)
def _forward(cfg):
  """One jitted forward per config; the tests share the batch shape [4, 15], so one compile."""
  model = Qwen2ForCausalLM(cfg)

  @jax.jit
  def forward(params, ids, positions, mask):
    return model.apply({"params": params}, ids, positions=positions, attention_mask=mask)[0]
  return forward


def _hf_logits(hf, ids, mask, positions=None):
  with torch.no_grad():
    out = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
             position_ids=None if positions is None else torch.tensor(positions, dtype=torch.long))
  return out.logits.numpy()


def _ids(cfg, shape, seed=0):
  return np.random.RandomState(seed).randint(0, cfg.vocab_size, shape).astype(np.int32)


def _right_padded(lengths, length):
  mask = (np.arange(length)[None] < np.asarray(lengths)[:, None]).astype(np.int32)
  return mask, np.broadcast_to(np.arange(length, dtype=np.int32), mask.shape).copy()


def _left_padded(lengths, length):
  mask = (np.arange(length)[None] >= length - np.asarray(lengths)[:, None]).astype(np.int32)
  return mask, np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)


@pytest.fixture(scope="module")
def tied():
  cfg = model_config("tiny").llm
  assert cfg.tie_word_embeddings
  hf = _hf_model(cfg)
  return cfg, hf, convert.params_from_hf(hf, cfg)


@pytest.fixture(scope="module")
def untied():
  cfg = dataclasses.replace(model_config("tiny").llm, tie_word_embeddings=False)
  hf = _hf_model(cfg, seed=1)
  return cfg, hf, convert.params_from_hf(hf, cfg)


def test_right_padding_matches_transformers(tied):
  cfg, hf, params = tied
  mask, positions = _right_padded([15, 9, 4, 1], 15)
  ids = _ids(cfg, mask.shape)
  ref = _hf_logits(hf, ids, mask)
  ours = np.asarray(_forward(cfg)(params, ids, positions, mask))
  real = mask.astype(bool)
  assert np.abs(ref[real]).max() > 1.0  # logits are not trivially small
  assert np.abs(ours - ref)[real].max() <= TOL

  # inputs_embeds from `embed` (the VLM's splice point) gives the same logits.
  model = Qwen2ForCausalLM(cfg)
  embeds = model.apply({"params": params}, ids, method="embed")
  assert embeds.shape == (*ids.shape, cfg.hidden_size)
  via_embeds, _ = jax.jit(lambda p, e: model.apply({"params": p}, inputs_embeds=e, positions=positions,
                                                   attention_mask=mask))(params, embeds)
  assert np.abs(np.asarray(via_embeds) - ours).max() <= 1e-6


def test_left_padding_matches_transformers(tied):
  cfg, hf, params = tied
  mask, positions = _left_padded([15, 4, 8, 0], 15)  # the last row is all padding
  ids = _ids(cfg, mask.shape, seed=1)
  ref = _hf_logits(hf, ids, mask, positions)
  ours = np.asarray(_forward(cfg)(params, ids, positions, mask))
  real = mask.astype(bool)
  assert np.abs(ours - ref)[real].max() <= TOL
  assert np.isfinite(ours).all()  # the fully padded row gives no NaN


@pytest.mark.parametrize("kernels", [True, False], ids=["cpu_kernels", "xla"])
def test_kv_cache_prefill_and_decode_match_full_forward(tied, kernels, monkeypatch):
  if not kernels:
    monkeypatch.setattr(cpu_kernels, "available", lambda: False)
  cfg, _, params = tied
  prompt, steps, slots = 7, 8, 16
  total = prompt + steps
  mask, positions = _left_padded([7, 3, 5, 1], prompt)
  mask = np.concatenate([mask, np.ones((4, steps), np.int32)], axis=1)                  # [B, 15]
  positions = np.concatenate([positions, positions[:, -1:] + 1 + np.arange(steps, dtype=np.int32)], axis=1)
  ids = _ids(cfg, (4, total), seed=2)
  full = np.asarray(_forward(cfg)(params, ids, positions, mask))
  real = mask.astype(bool)

  model = Qwen2ForCausalLM(cfg)
  slot_mask = np.concatenate([mask, np.zeros((4, slots - total), np.int32)], axis=1)    # [B, S]

  @jax.jit
  def step(params, ids, positions, cache, index):
    return model.apply({"params": params}, ids, positions=positions, attention_mask=slot_mask,
                       cache=cache, cache_index=index)

  logits, cache = step(params, ids[:, :prompt], positions[:, :prompt], init_cache(cfg, 4, slots), jnp.int32(0))
  assert len(cache) == cfg.num_hidden_layers
  assert cache[0]["k"].shape == (4, slots, cfg.num_key_value_heads, cfg.head_dim)
  errors = [np.abs(np.asarray(logits) - full[:, :prompt])[real[:, :prompt]].max()]
  for t in range(prompt, total):
    logits, cache = step(params, ids[:, t:t + 1], positions[:, t:t + 1], cache, jnp.int32(t))
    errors.append(np.abs(np.asarray(logits)[:, 0] - full[:, t]).max())
  assert max(errors) <= TOL, errors
  assert step._cache_size() == 2  # one program for the prefill, one for every decode step
  assert not np.asarray(cache[0]["k"][:, total:]).any()  # slots past the last token stay empty


@pytest.mark.parametrize("b,kv,g,hd,slots", [(1, 2, 7, 64, 1088), (3, 2, 2, 16, 37), (2, 1, 4, 72, 9),
                                             (2, 2, 10, 16, 300)])
def test_decode_attention_kernel_equals_the_xla_formulation(b, kv, g, hd, slots):
  """The kernel (tasks of 128 slots; up to 8 queries of a KV head per unit, so G = 10 is a unit of 8
  and one of 2) equals XLA's formulation, including a chunk with no visible slot and a row that sees
  only its own token."""
  if not cpu_kernels.available():
    pytest.skip("CPU kernels unavailable here (no AVX2/FMA or no compiler)")
  rng = np.random.default_rng(slots)
  q, k_new, v_new = (rng.normal(size=s).astype(np.float32) for s in [(b, kv, g, hd), (b, kv, hd), (b, kv, hd)])
  k_cache, v_cache = (rng.normal(size=(b, slots, kv, hd)).astype(np.float32) * 3 for _ in range(2))
  mask = rng.random((b, slots)) < 0.7
  mask[0, -1] = False          # the last slot (outside any block of 8 when slots % 8 != 0) masked
  mask[-1, :] = False          # a row that sees only its own token
  if slots > 256:
    mask[0, 128:256] = False   # a whole chunk of slots masked
  kw = dict(scale=hd ** -0.5, dtype=jnp.float32)
  got = jax.jit(functools.partial(qwen2._attend_one_query, **kw))(q, k_new, v_new, k_cache, v_cache, mask)
  want = jax.jit(functools.partial(qwen2._attend_one_query_xla, **kw))(q, k_new, v_new, k_cache, v_cache, mask)
  assert "tinyvlm_decode_attention" in jax.jit(functools.partial(qwen2._attend_one_query, **kw)).lower(
      q, k_new, v_new, k_cache, v_cache, mask).as_text()
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(got)[-1], np.broadcast_to(v_new[-1][:, None], (kv, g, hd)), rtol=1e-6)


@pytest.mark.parametrize("b,length,kv,g,hd,slots",
                         [(1, 200, 2, 7, 64, 264), (3, 50, 1, 3, 16, 61), (2, 9, 2, 1, 48, 9)])
def test_prefill_attention_kernel_equals_the_xla_formulation(b, length, kv, g, hd, slots):
  if not cpu_kernels.available():
    pytest.skip("CPU kernels unavailable here (no AVX2/FMA or no compiler)")
  rng = np.random.default_rng(length)
  q = rng.normal(size=(b, length, kv, g, hd)).astype(np.float32)
  k, v = (rng.normal(size=(b, slots, kv, hd)).astype(np.float32) * 3 for _ in range(2))
  slot_mask = np.ones((b, slots), np.int32)
  slot_mask[0, :length // 3] = 0   # left padding: the first rows see no key at all
  slot_mask[-1, :length] = 0       # a row whose whole prompt is padding
  mask = np.array(qwen2.attention_mask_for(slot_mask, length, jnp.int32(0)))    # causal, [B, L, S]
  if b > 2:
    mask[1] = rng.random((length, slots)) < 0.5                                  # and an arbitrary one
  kw = dict(scale=hd ** -0.5, dtype=jnp.float32)
  got = jax.jit(functools.partial(qwen2._attend_prefill, **kw))(q, k, v, mask)
  want = jax.jit(functools.partial(qwen2._attend_chunk, **kw))(q, k, v, mask)
  assert "tinyvlm_chunk_attention" in jax.jit(functools.partial(qwen2._attend_prefill, **kw)).lower(
      q, k, v, mask).as_text()
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
  assert not mask[-1].any()  # every query of the last row sees nothing: the mean of all values
  np.testing.assert_allclose(np.asarray(got)[-1], np.broadcast_to(v[-1].mean(0)[None, :, None], q.shape[1:]),
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("lead,k,n", [((1, 1), 37, 24), ((2, 8), 64, 8), ((3,), 896, 136), ((2,), 21, 16392)])
def test_dense_gemv_kernel_equals_the_xla_dot(lead, k, n):
  """nn.Dense with cpu_kernels.dense_dot_general: a float32 product of at most 16 rows runs the
  gemv_f32 kernel (any K, including one that is not a multiple of its 4-row steps; N above 16384 split
  by columns), equal to XLA's dot, the same on every call, with XLA's gradient; other products stay
  XLA's."""
  if not cpu_kernels.available():
    pytest.skip("CPU kernels unavailable here (no AVX2/FMA or no compiler)")
  rng = np.random.default_rng(k)
  x = jnp.asarray(rng.normal(size=lead + (k,)).astype(np.float32))
  params = {"kernel": jnp.asarray(rng.normal(size=(k, n)).astype(np.float32)),
            "bias": jnp.asarray(rng.normal(size=(n,)).astype(np.float32))}
  ours, plain = nn.Dense(n, dot_general=cpu_kernels.dense_dot_general), nn.Dense(n)
  apply = jax.jit(lambda p, x: ours.apply({"params": p}, x))
  assert "tinyvlm_gemv_f32" in apply.lower(params, x).as_text()
  got, want = apply(params, x), plain.apply({"params": params}, x)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5 * np.sqrt(k))
  assert np.array_equal(np.asarray(apply(params, x)), np.asarray(got))  # deterministic
  loss = lambda module: jax.grad(lambda p, x: jnp.sum(jnp.sin(module.apply({"params": p}, x))), argnums=(0, 1))
  for g_ours, g_plain in zip(jax.tree.leaves(loss(ours)(params, x)), jax.tree.leaves(loss(plain)(params, x))):
    np.testing.assert_allclose(np.asarray(g_ours), np.asarray(g_plain), rtol=1e-5, atol=1e-5 * np.sqrt(k))
  many = jnp.ones((17, k), jnp.float32)  # more rows than a decode step: XLA's dot
  assert "tinyvlm_gemv_f32" not in apply.lower(params, many).as_text()
  odd = {"kernel": params["kernel"][:, :n - 1], "bias": params["bias"][:n - 1]}  # N % 8 != 0: XLA's dot
  assert "tinyvlm_gemv_f32" not in jax.jit(
      lambda p, x: nn.Dense(n - 1, dot_general=cpu_kernels.dense_dot_general).apply({"params": p}, x)).lower(
          odd, x).as_text()


@pytest.mark.parametrize("rows,d", [(2, 64), (3, 264), (8, 24), (11, 264), (16, 64)])
def test_tied_head_kernel_equals_the_xla_dot(rows, d):
  """cpu_kernels.tied_logits: a float32 batched decode step (2 to 16 rows) runs the gemv_f32_t
  kernel (D below and above its 256-column steps, rows in blocks of 4 and the rest), equal to XLA's
  dot, each row with the same bits as the kernel gives it alone, with XLA's gradient; one row and
  other shapes stay XLA's."""
  if not cpu_kernels.available():
    pytest.skip("CPU kernels unavailable here (no AVX2/FMA or no compiler)")
  rng = np.random.default_rng(rows)
  v = 8 * 67  # several row blocks per thread, each with its own next-tile prefetch
  x = jnp.asarray(rng.normal(size=(rows, d)).astype(np.float32))
  emb = jnp.asarray(rng.normal(size=(v, d)).astype(np.float32))
  head = jax.jit(cpu_kernels.tied_logits)
  assert "tinyvlm_gemv_f32_t" in head.lower(x, emb).as_text()
  got = np.asarray(head(x, emb))
  want = np.asarray(x) @ np.asarray(emb).T
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.sqrt(d))
  assert "tinyvlm_gemv_f32_t" not in head.lower(x[:1], emb).as_text()  # one row: XLA's dot
  kernel_alone = jax.jit(lambda x, e: cpu_kernels.call("gemv_f32_t", (1, v), x, e))
  alone = np.concatenate([np.asarray(kernel_alone(x[i:i + 1], emb)) for i in range(rows)])
  np.testing.assert_array_equal(got, alone)  # the kernel gives a row the same bits alone as in a batch
  c = jnp.asarray(rng.normal(size=(rows, v)).astype(np.float32))  # a linear loss: gradients c @ emb, c.T @ x
  loss = lambda f: jax.grad(lambda x, e: jnp.sum(f(x, e) * c), argnums=(0, 1))
  for g_ours, g_plain in zip(loss(cpu_kernels.tied_logits)(x, emb), loss(lambda x, e: x @ e.T)(x, emb)):
    np.testing.assert_allclose(np.asarray(g_ours), np.asarray(g_plain), rtol=1e-5, atol=1e-5 * np.sqrt(v))
  assert "tinyvlm_gemv_f32_t" not in head.lower(jnp.ones((17, d)), emb).as_text()  # not a decode step
  assert "tinyvlm_gemv_f32_t" not in head.lower(x, emb[:-1]).as_text()  # V % 8 != 0


def test_untied_head_matches_transformers(untied):
  cfg, hf, params = untied
  assert params["lm_head"]["kernel"].shape == (cfg.hidden_size, cfg.vocab_size)
  mask, positions = _left_padded([15, 9, 2, 12], 15)
  ids = _ids(cfg, mask.shape, seed=3)
  ref = _hf_logits(hf, ids, mask, positions)
  ours = np.asarray(_forward(cfg)(params, ids, positions, mask))
  assert np.abs(ours - ref)[mask.astype(bool)].max() <= TOL


@pytest.mark.parametrize("variant", ["tied", "untied"])
def test_round_trip_is_bit_exact_and_matches_save_pretrained(variant, request, tmp_path):
  cfg, hf, params = request.getfixturevalue(variant)
  exported = convert.hf_state_from_params({"params": params}, cfg)
  hf.save_pretrained(tmp_path)
  saved = load_state_dict(tmp_path)
  # Same keys as transformers' own checkpoint (no lm_head.weight when tied), same bits.
  assert sorted(exported) == sorted(saved)
  assert ("lm_head.weight" in exported) == (not cfg.tie_word_embeddings)
  state = hf.state_dict()
  for key, value in exported.items():
    assert value.dtype == np.float32 and value.shape == tuple(state[key].shape), key
    assert np.array_equal(value, state[key].numpy()), key
    assert np.array_equal(value, saved[key]), key
  # Reading the saved folder gives the same Flax params, bit for bit.
  again = convert.params_from_hf(tmp_path, cfg)
  for (path, a), (path_b, b) in zip(sorted(flatten(params).items()), sorted(flatten(again).items())):
    assert path == path_b and np.array_equal(a, b), path
  assert convert.config_from_hf(hf.config) == cfg


def test_full_size_structure_matches_transformers_without_weights():
  cfg = model_config("tinyvlm_0p6b").llm
  shapes = flatten(convert.param_shapes(cfg))
  with torch.device("meta"):
    hf = transformers.Qwen2ForCausalLM(convert.to_hf_config(cfg))
  hf_params = dict(hf.named_parameters())  # the tied lm_head is listed once, as the embedding
  table = convert.param_table(cfg)
  assert sorted(rule.hf for rule in table) == sorted(hf_params)
  assert sorted(rule.flax for rule in table) == sorted(shapes)
  for rule in table:
    hf_shape = tuple(hf_params[rule.hf].shape)
    as_flax = TRANSFORMS[rule.transform][0](np.empty(hf_shape, np.int8)).shape
    assert as_flax == tuple(shapes[rule.flax].shape), (rule.hf, hf_shape, shapes[rule.flax].shape)
  n_flax = sum(int(np.prod(s.shape)) for s in shapes.values())
  n_torch = sum(p.numel() for p in hf.parameters())
  assert n_flax == n_torch
  assert abs(n_flax / 1e6 - 494.0) < 0.05, n_flax
  assert convert.config_from_hf(convert.to_hf_config(cfg)) == cfg


def test_checkpoint_mismatches_name_the_key(tied):
  cfg, hf, _ = tied
  state = {k: v.numpy() for k, v in hf.state_dict().items()}
  key = "model.layers.1.self_attn.k_proj.weight"
  want = state[key].shape
  bad = dict(state, **{key: state[key][:-1]})
  with pytest.raises(CheckpointMismatchError) as err:
    convert.params_from_hf(bad, cfg)
  assert key in str(err.value) and str(bad[key].shape) in str(err.value) and str(want) in str(err.value)

  missing = {k: v for k, v in state.items() if k != "model.norm.weight"}
  with pytest.raises(CheckpointMismatchError, match="model.norm.weight"):
    convert.params_from_hf(missing, cfg)

  # A tied model's lm_head.weight is accepted only when it is the embedding.
  other_head = dict(state, **{"lm_head.weight": state["lm_head.weight"] + 1})
  with pytest.raises(CheckpointMismatchError, match="lm_head.weight"):
    convert.params_from_hf(other_head, cfg)


def test_remat_keeps_logits_and_gradients(tied):
  cfg, _, params = tied
  # One decoder layer keeps the three gradient compilations short.
  cfg = dataclasses.replace(cfg, num_hidden_layers=1)
  params = {k: v for k, v in params.items() if k != "layers_1"}
  mask, positions = _left_padded([6, 3], 6)
  ids = _ids(cfg, mask.shape, seed=4)
  weights = jnp.asarray(np.random.RandomState(5).randn(*mask.shape, cfg.vocab_size), jnp.float32)

  def loss_and_grad(remat):
    model = Qwen2ForCausalLM(dataclasses.replace(cfg, remat=remat))
    loss = lambda p: jnp.sum(model.apply({"params": p}, ids, positions=positions, attention_mask=mask)[0] * weights)
    grad_fn = jax.value_and_grad(loss)
    # nn.remat shows up as a remat (jax.checkpoint) primitive in the gradient's program.
    program = str(jax.make_jaxpr(grad_fn)(params))
    assert bool(re.search(r"\b(remat2?|checkpoint)\[", program)) == (remat != "none"), remat
    return jax.jit(grad_fn)(params)

  base, base_grad = loss_and_grad("none")
  for remat in ("full", "dots"):
    value, grad = loss_and_grad(remat)
    assert abs(float(value) - float(base)) <= 1e-5 * abs(float(base)), remat
    diffs = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(a)).max()),
                         base_grad, grad)
    assert max(jax.tree.leaves(diffs)) <= 1e-5, (remat, diffs)


def test_initializer_range_sets_the_init_std_and_round_trips_through_transformers():
  base = model_config("tiny").llm
  assert base.initializer_range == 0.02  # transformers' Qwen2Config default
  for std in (0.02, 0.1):
    cfg = dataclasses.replace(base, initializer_range=std)
    ids = jnp.zeros((1, 4), jnp.int32)
    params = Qwen2ForCausalLM(cfg).init(jax.random.PRNGKey(0), ids, positions=jnp.arange(4)[None],
                                        attention_mask=jnp.ones((1, 4), jnp.int32))["params"]
    for name in (("embed_tokens", "embedding"), ("layers_0", "mlp", "up_proj", "kernel")):
      got = float(np.std(flatten(params)[name]))
      assert abs(got / std - 1) < 0.05, (name, got, std)
    hf_cfg = convert.to_hf_config(cfg)
    assert hf_cfg.initializer_range == std
    assert convert.config_from_hf(hf_cfg) == cfg
