"""Qwen2 (Qwen2.5) decoder in Flax Linen, with a fixed-length KV cache.

Numerically matches transformers' `Qwen2ForCausalLM` (eager attention): GQA with q/k/v
bias, RoPE in HF's rotate_half layout, SwiGLU MLP, RMSNorm in float32, tied or separate
LM head. Parameter names follow transformers' modules so `convert/qwen2.py` is a table
of transposes.

One attention rule serves every case: with a cache of S slots and a scalar
`cache_index`, the chunk's keys/values are written at slots [cache_index, cache_index+L)
and the query at slot cache_index+t attends to slots s <= cache_index+t whose
`attention_mask[b, s]` is 1. Prefill (L tokens) and one-token decode steps are then the
same program, and per-row `positions` give left padding.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tinyvlm_jax import cpu_kernels
from tinyvlm_jax.models.config import QwenConfig
from tinyvlm_jax.quantize import QuantDense, QuantEmbed, QuantWeights, quant_dense_group

# Logit for masked (batch, query, key) entries: finite, so a fully padded row gives a
# uniform softmax instead of NaN.
_MASKED = -1e30

_REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def init_cache(config: QwenConfig, batch: int, max_len: int, dtype=jnp.float32) -> list[dict]:
  """An empty KV cache: per layer {"k", "v"} of shape [B, S, num_key_value_heads, head_dim]."""
  shape = (batch, max_len, config.num_key_value_heads, config.head_dim)
  return [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
          for _ in range(config.num_hidden_layers)]


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding, HF layout (rotate_half over the two halves of head_dim).

  x: [B, L, N, head_dim]; positions: [B, L] int.
  """
  head_dim = x.shape[-1]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  freqs = positions[..., None].astype(jnp.float32) * inv_freq          # [B, L, head_dim/2]
  emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]        # [B, L, 1, head_dim]
  cos, sin = jnp.cos(emb).astype(x.dtype), jnp.sin(emb).astype(x.dtype)
  x1, x2 = jnp.split(x, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return x * cos + rotated * sin


def _dense(config: QwenConfig, features: int, *, use_bias: bool, name: str | None = None) -> nn.Module:
  """nn.Dense (a decode step's float32 product on CPU runs the `gemv_f32` kernel: see
  `cpu_kernels.dense_dot_general`; a prefill's has bfloat16 operands when `config.matmul_dtype` says so),
  or its weight-only quantized twin when `config.quantization` is set."""
  dtype = jnp.dtype(config.dtype)
  if config.quantization != "none":
    return QuantDense(features, config.quantization, use_bias=use_bias, dtype=dtype,
                      matmul_dtype=config.matmul_dtype, name=name)
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
                  kernel_init=nn.initializers.normal(config.initializer_range),
                  dot_general=cpu_kernels.matmul_dot_general(config.matmul_dtype), name=name)


def _projections(config: QwenConfig, x, outputs, *, use_bias: bool) -> list:
  """[_dense(config, features, name=name)(x) for features, name in outputs]: the same params and
  results, but quantized layers run as one `quant_dense_group` (a decode step on CPU reads all their
  weights in one kernel call: q, k and v, or gate and up)."""
  if config.quantization == "none":
    return [_dense(config, features, use_bias=use_bias, name=name)(x) for features, name in outputs]
  layers = [QuantWeights(features, x.shape[-1], config.quantization, use_bias, name=name) for features, name in outputs]
  return quant_dense_group(x, layers, jnp.dtype(config.dtype), config.matmul_dtype)


def _rms_norm(config: QwenConfig, name: str) -> nn.RMSNorm:
  # Flax computes the statistics and the scaling in float32 (like HF) and casts the result.
  return nn.RMSNorm(epsilon=config.rms_norm_eps, dtype=jnp.dtype(config.dtype),
                    param_dtype=jnp.float32, name=name)


def _attend_prefill(q, k, v, mask, scale: float, dtype):
  """`_attend_chunk` for a prompt chunk against the KV cache (inference: no gradient is taken).

  On CPU, in float32 with head_dim a multiple of 16, the `chunk_attention` kernel of
  `tinyvlm_jax.cpu_kernels`: it computes only the key columns that a block of 48 queries sees, so
  neither the masked half of the causal scores nor the cache's empty slots cost anything. Measured
  per layer of the full-size LLM (2 cores, the two timed in turn): 13 ms against `_attend_chunk`'s
  42 ms for an 832-token prefill (896 slots), 13 against 45 ms at 896 tokens (76 of them padding).
  """
  xla = functools.partial(_attend_chunk, scale=scale, dtype=dtype)
  if not (jnp.dtype(dtype) == jnp.float32 and cpu_kernels.fits(q, k, v, multiple=16)):
    return xla(q, k, v, mask)

  def cpu(q, k, v, mask):
    return cpu_kernels.call("chunk_attention", q.shape, q, k, v, mask, scale=np.float32(scale))
  return jax.lax.platform_dependent(q, k, v, mask.astype(bool), cpu=cpu, default=xla)


def _attend_chunk(q, k, v, mask, scale: float, dtype):
  """q [B, L, KV, G, hd] against k, v [B, K, KV, hd] with mask [B, L, K] -> [B, L, KV, G, hd].

  Heads-major copies of q, k, v first (small) so both products are plain batched dots, the
  mask as an additive bias, and the softmax normalised after the value product: on XLA:CPU
  about 2x faster than einsums over the [B, L, KV, G, hd] layout with a masked softmax.
  """
  b, length, kv, g, hd = q.shape
  keys = k.shape[1]
  qh = jnp.transpose(q, (0, 2, 3, 1, 4)).reshape(b, kv, g * length, hd)
  kh, vh = jnp.transpose(k, (0, 2, 1, 3)), jnp.transpose(v, (0, 2, 1, 3))   # [B, KV, K, hd]
  bias = jnp.where(mask, 0.0, _MASKED)[:, None, None]                       # [B, 1, 1, L, K]
  logits = jnp.einsum("bkmd,bksd->bkms", qh, kh, preferred_element_type=jnp.float32)
  logits = logits.reshape(b, kv, g, length, keys) * scale + bias
  # The shift is held constant for the gradient (softmax does not depend on it), as jax.nn.softmax
  # does: jnp.max's own gradient divides by a count of equal elements, which an XLA:CPU build at
  # optimisation level 0 can make 0 (NaN).
  shift = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
  weights = jnp.exp(logits - shift)                                         # [B, KV, G, L, K]
  out = jnp.einsum("bkms,bksd->bkmd", weights.reshape(b, kv, g * length, keys).astype(dtype), vh)
  out = out.reshape(b, kv, g, length, hd) / jnp.sum(weights, axis=-1)[..., None].astype(dtype)
  return jnp.transpose(out, (0, 3, 1, 2, 4))


def _write_cache(cache: dict, k, v, cache_index) -> dict:
  """k, v [B, L, KV, hd] written into the cache [B, S, KV, hd] at slot cache_index (the same for every row)."""
  start = (0, cache_index, 0, 0)
  return {"k": jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), start),
          "v": jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), start)}


def _attend_one_query(q, k_new, v_new, k_cache, v_cache, mask, scale: float, dtype):
  """One decode step: q [B, KV, G, hd] attends to its own k_new, v_new [B, KV, hd] and to the
  cache as it was before this step, k_cache, v_cache [B, S, KV, hd] (mask [B, S]) -> [B, KV, G, hd].

  On CPU, in float32, the `decode_attention` kernel of `tinyvlm_jax.cpu_kernels` (one task per
  row and chunk of 128 slots); elsewhere `_attend_one_query_xla`. Measured for the full-size LLM's
  24 layers at 896 slots (2 cores): 2.2-2.8 ms with the kernel against 8.7-12 ms without at batch 1,
  20 against 66 ms at batch 8.
  """
  xla = functools.partial(_attend_one_query_xla, scale=scale, dtype=dtype)
  args = (q, k_new, v_new, k_cache, v_cache)
  if not (jnp.dtype(dtype) == jnp.float32 and cpu_kernels.fits(*args, multiple=8)):
    return xla(*args, mask)

  def cpu(*operands):
    return cpu_kernels.call("decode_attention", q.shape, *operands, scale=np.float32(scale))
  return jax.lax.platform_dependent(*args, mask.astype(bool), cpu=cpu, default=xla)


def _attend_one_query_xla(q, k_new, v_new, k_cache, v_cache, mask, *, scale: float, dtype):
  """`_attend_one_query` in XLA ops. Two XLA:CPU costs avoided: reading the updated cache (its
  update then had two readers, the carried cache and attention, and XLA duplicated it with two
  whole-cache copies per layer), and batched dots over the KV heads (a whole-cache transpose per
  step). Both products here are plain dots on the cache as stored, [B, S, KV*hd]: the queries
  enter as a block-diagonal [KV*hd, KV*G] matrix whose off-diagonal zeros cost KV-1 times the
  useful work, a few kFLOPs per slot.
  """
  b, kv, g, hd = q.shape
  s = k_cache.shape[1]
  eye = jnp.eye(kv, dtype=q.dtype)
  q_blocks = jnp.einsum("bkgd,kj->bkdjg", q, eye).reshape(b, kv * hd, kv * g)
  logits = jnp.einsum("bsc,bcj->bsj", k_cache.reshape(b, s, kv * hd), q_blocks)   # [B, S, KV*G]
  logits = jnp.where(mask[:, :, None], logits.astype(jnp.float32), _MASKED)
  own = jnp.einsum("bkgd,bkd->bkg", q, k_new).reshape(b, 1, kv * g).astype(jnp.float32)
  probs = jax.nn.softmax(jnp.concatenate([logits, own], axis=1) * scale, axis=1).astype(dtype)  # [B, S+1, KV*G]
  out = jnp.einsum("bsj,bsc->bjc", probs[:, :s], v_cache.reshape(b, s, kv * hd))  # [B, KV*G, KV*hd]
  out = jnp.einsum("bjgkd,jk->bjgd", out.reshape(b, kv, g, kv, hd), eye)         # diagonal blocks
  return out + probs[:, s].reshape(b, kv, g)[..., None] * v_new[:, :, None, :]


class Qwen2Attention(nn.Module):
  """Grouped-query self-attention with RoPE and an optional KV cache."""
  config: QwenConfig

  @nn.compact
  def __call__(self, x, positions, mask, cache=None, cache_index=None):
    """x: [B, L, D]; mask: [B, L, K] bool over keys (K = L, or S cache slots)."""
    c = self.config
    dtype = jnp.dtype(c.dtype)
    batch, length, _ = x.shape
    heads, kv_heads, head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    groups = heads // kv_heads

    q, k, v = _projections(c, x, [(heads * head_dim, "q_proj"), (kv_heads * head_dim, "k_proj"),
                                  (kv_heads * head_dim, "v_proj")], use_bias=True)
    q = apply_rope(q.reshape(batch, length, heads, head_dim), positions, c.rope_theta)
    k = apply_rope(k.reshape(batch, length, kv_heads, head_dim), positions, c.rope_theta)
    v = v.reshape(batch, length, kv_heads, head_dim)

    # GQA: query head h uses KV head h // groups (HF's repeat_kv), done by grouping the
    # query heads instead of copying K/V: [B, L, H, hd] -> [B, L, KV, G, hd].
    q = q.reshape(batch, length, kv_heads, groups, head_dim)
    new_cache = None
    if cache is not None and length == 1:  # decode step: attention reads the cache before this token
      earlier = mask[:, 0] & (jnp.arange(mask.shape[-1]) != cache_index)[None]   # [B, S]
      out = _attend_one_query(q[:, 0], k[:, 0], v[:, 0], cache["k"].astype(dtype), cache["v"].astype(dtype),
                              earlier, head_dim ** -0.5, dtype)        # [B, KV, G, hd]
      # Adding 0 * (a value computed from those reads) makes the in-place write depend on them, so
      # XLA orders the reads first instead of copying the whole cache twice to protect them.
      after_reads = jnp.zeros((), dtype) * out[0, 0, 0, 0]
      new_cache = _write_cache(cache, k + after_reads, v + after_reads, cache_index)
    else:
      if cache is None:
        out = _attend_chunk(q, k, v, mask, head_dim ** -0.5, dtype)        # [B, L, KV, G, hd]
      else:
        new_cache = _write_cache(cache, k, v, cache_index)
        out = _attend_prefill(q, new_cache["k"].astype(dtype), new_cache["v"].astype(dtype), mask,
                              head_dim ** -0.5, dtype)
    out = out.reshape(batch, length, heads * head_dim)
    return _dense(c, c.hidden_size, use_bias=False, name="o_proj")(out), new_cache


class Qwen2MLP(nn.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""
  config: QwenConfig

  @nn.compact
  def __call__(self, x):
    c = self.config
    if c.hidden_act != "silu":
      raise ValueError(f"QwenConfig.hidden_act={c.hidden_act!r}: only 'silu' is implemented")
    gate, up = _projections(c, x, [(c.intermediate_size, "gate_proj"), (c.intermediate_size, "up_proj")],
                            use_bias=False)
    return _dense(c, c.hidden_size, use_bias=False, name="down_proj")(nn.silu(gate) * up)


class Qwen2DecoderLayer(nn.Module):
  """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""
  config: QwenConfig

  @nn.compact
  def __call__(self, x, positions, mask, cache=None, cache_index=None):
    h, new_cache = Qwen2Attention(self.config, name="self_attn")(
        _rms_norm(self.config, "input_layernorm")(x), positions, mask, cache, cache_index)
    x = x + h
    x = x + Qwen2MLP(self.config, name="mlp")(_rms_norm(self.config, "post_attention_layernorm")(x))
    return x, new_cache


def _layer_class(remat: str):
  if remat == "none":
    return Qwen2DecoderLayer
  if remat not in _REMAT_POLICIES:
    raise ValueError(f"QwenConfig.remat={remat!r}; expected one of ['none', {', '.join(map(repr, _REMAT_POLICIES))}]")
  return nn.remat(Qwen2DecoderLayer, policy=_REMAT_POLICIES[remat])


def attention_mask_for(attention_mask, length: int, cache_index=None):
  """Boolean [B, L, K] mask: key s is visible to query t if it is causal and real.

  Without a cache K = L and causality is s <= t. With a cache K = S slots (the width of
  `attention_mask`) and the query t sits at slot cache_index + t.
  """
  keys = attention_mask.shape[1]
  offset = 0 if cache_index is None else cache_index
  query_slot = offset + jnp.arange(length)[:, None]                     # [L, 1]
  causal = jnp.arange(keys)[None, :] <= query_slot                      # [L, K]
  return causal[None] & attention_mask.astype(bool)[:, None, :]         # [B, L, K]


class Qwen2ForCausalLM(nn.Module):
  """Qwen2 decoder with LM head: (logits [B, L, V] float32, new cache or None)."""
  config: QwenConfig

  def setup(self):
    c = self.config
    dtype = jnp.dtype(c.dtype)
    if c.quantization != "none":
      self.embed_tokens = QuantEmbed(c.vocab_size, c.hidden_size, c.quantization, dtype=dtype)
    else:
      self.embed_tokens = nn.Embed(c.vocab_size, c.hidden_size, dtype=dtype, param_dtype=jnp.float32,
                                   embedding_init=nn.initializers.normal(c.initializer_range))
    layer = _layer_class(c.remat)
    self.layers = [layer(c) for _ in range(c.num_hidden_layers)]   # named layers_0 ... layers_{n-1}
    self.norm = nn.RMSNorm(epsilon=c.rms_norm_eps, dtype=dtype, param_dtype=jnp.float32)
    if not c.tie_word_embeddings:
      self.lm_head = _dense(c, c.vocab_size, use_bias=False)

  def embed(self, input_ids):
    """Token embeddings: [B, L] int -> [B, L, D]."""
    return self.embed_tokens(input_ids)

  def __call__(self, input_ids=None, *, inputs_embeds=None, positions, attention_mask,
               cache=None, cache_index=None, last_only: bool = False, hidden_only: bool = False):
    """Runs the decoder on a chunk of L tokens.

    `last_only`: logits of the chunk's last position only ([B, 1, V]): prefill needs no more,
    and the LM head over 151,936 ids at every prompt position would cost more than a layer.
    `hidden_only`: return the final-normed hidden states [B, L, D] instead of logits, so a
    trainer can apply `lm_logits` to the supervised positions only.

    input_ids [B, L] or inputs_embeds [B, L, D] (exactly one); positions [B, L] int32
    (RoPE position ids). Without cache: attention_mask [B, L], 1 = real token. With a
    cache from `init_cache` (S slots) and a scalar int32 cache_index: attention_mask
    [B, S] over cache slots, and the chunk is written at slots [cache_index, cache_index+L).
    """
    if (input_ids is None) == (inputs_embeds is None):
      raise ValueError("Qwen2ForCausalLM: pass exactly one of input_ids and inputs_embeds")
    if (cache is None) != (cache_index is None):
      raise ValueError("Qwen2ForCausalLM: cache and cache_index go together")
    c = self.config
    x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds.astype(jnp.dtype(c.dtype))
    length = x.shape[1]
    if cache is not None and len(cache) != c.num_hidden_layers:
      raise ValueError(f"cache has {len(cache)} layers, the model has {c.num_hidden_layers}")
    if cache is None and attention_mask.shape[1] != length:
      raise ValueError(f"attention_mask has {attention_mask.shape[1]} columns, expected the chunk "
                       f"length {length} (without a cache)")
    if cache is not None and attention_mask.shape[1] != cache[0]["k"].shape[1]:
      raise ValueError(f"attention_mask has {attention_mask.shape[1]} columns, expected the cache's "
                       f"{cache[0]['k'].shape[1]} slots")
    mask = attention_mask_for(attention_mask, length, cache_index)      # [B, L, K]

    new_cache = [] if cache is not None else None
    for i, layer in enumerate(self.layers):
      x, layer_cache = layer(x, positions, mask, None if cache is None else cache[i], cache_index)
      if cache is not None:
        new_cache.append(layer_cache)
    x = self.norm(x[:, -1:] if last_only else x)
    if hidden_only:
      return x, new_cache
    return self.lm_logits(x), new_cache

  def lm_logits(self, x):
    """Final-normed hidden states [..., D] -> float32 logits [..., V] (tied or separate head)."""
    dtype = jnp.dtype(self.config.dtype)
    if self.config.tie_word_embeddings and self.config.quantization != "none":
      logits = self.embed_tokens.attend(x)                              # [..., D] -> [..., V]
    elif self.config.tie_word_embeddings:
      # Not `Embed.attend` (x @ E.T): XLA:CPU fuses that transpose into a single-threaded loop
      # (100 ms per decode step); contracting E's last axis directly is one plain GEMV, and a float32
      # decode step runs the CPU kernel that reads E once for all rows (`cpu_kernels.tied_logits`).
      logits = cpu_kernels.tied_logits(x.astype(dtype), self.embed_tokens.embedding.astype(dtype))
    else:
      logits = self.lm_head(x.astype(dtype))
    return logits.astype(jnp.float32)
