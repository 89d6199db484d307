"""The three small heads that are ours, not transformers': ConvPooler, Connector, CrossAttentionFuser."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from tinyvlm_jax.models.positional import sincos_2d
from tinyvlm_jax.quantize import dense, patch_conv


def identity_tap_init(scale: float):
  """Conv kernel init [kh, kw, C, C] = scale * identity on every tap (2x2 average pooling for 0.25)."""
  def init(key, shape, dtype=jnp.float32):
    del key
    kh, kw, cin, cout = shape
    if cin != cout:
      raise ValueError(f"identity tap init needs equal in/out channels, got kernel shape {shape}")
    return jnp.broadcast_to(scale * jnp.eye(cin, dtype=dtype), (kh, kw, cin, cout))
  return init


class ConvPooler(nn.Module):
  """Cuts each view's patch grid by `stride` per side: `conv` (learned, 2x2 average at init), `mean` or `none`."""
  kind: str = "conv"
  stride: int = 2
  dtype: jnp.dtype = jnp.float32
  quantization: str = "none"  # weight-only quantization of the conv (tinyvlm_jax.quantize)

  @nn.compact
  def __call__(self, x):  # [N, g*g, D] -> [N, (g/s)^2, D]
    if self.kind == "none":
      return x
    n, p, d = x.shape
    g = math.isqrt(p)
    if g * g != p or g % self.stride:
      raise ValueError(f"ConvPooler: {p} tokens are not a square grid divisible by stride {self.stride}")
    x = x.reshape(n, g, g, d)
    s = self.stride
    if self.kind == "conv":
      x = patch_conv(d, s, d, self.quantization, dtype=self.dtype, name="conv",
                     kernel_init=identity_tap_init(1.0 / (s * s)), bias_init=nn.initializers.zeros)(x)
    elif self.kind == "mean":
      x = nn.avg_pool(x, (s, s), strides=(s, s), padding="VALID")
    else:
      raise ValueError(f"unknown pooler kind {self.kind!r}; expected conv, mean or none")
    return x.reshape(n, -1, d)


class Connector(nn.Module):
  """2-layer MLP from vision width to LLM width: Dense, GELU, Dense."""
  width: int
  dtype: jnp.dtype = jnp.float32
  quantization: str = "none"  # weight-only quantization of both layers (tinyvlm_jax.quantize)

  @nn.compact
  def __call__(self, x):  # [..., D_vis] -> [..., D_llm]
    x = dense(self.width, x.shape[-1], self.quantization, dtype=self.dtype, name="fc1")(x)
    x = nn.gelu(x, approximate=False)
    return dense(self.width, self.width, self.quantization, dtype=self.dtype, name="fc2")(x)


class CrossAttentionFuser(nn.Module):
  """CNN tokens attend to the unpooled global ViT tokens (paper eq. 1-3, DESIGN 1.2).

  Q = E_cnn W_q, KV = E_g W_kv (one projection shared by keys and values),
  A = softmax((Q + PE_q)(KV + PE_kv)^T / sqrt(d_head)), out = A KV.
  """
  width: int
  num_heads: int = 1
  dtype: jnp.dtype = jnp.float32
  quantization: str = "none"  # weight-only quantization of both projections (tinyvlm_jax.quantize)

  @nn.compact
  def __call__(self, cnn_tokens, vit_tokens):  # [B, Nc, Dc], [B, Nv, Dv] -> [B, Nc, width]
    b, nc, _ = cnn_tokens.shape
    nv = vit_tokens.shape[1]
    q = dense(self.width, cnn_tokens.shape[-1], self.quantization, dtype=self.dtype, name="q_proj")(cnn_tokens)
    kv = dense(self.width, vit_tokens.shape[-1], self.quantization, dtype=self.dtype, name="kv_proj")(vit_tokens)
    frame = math.isqrt(nv)
    pe_q = sincos_2d(math.isqrt(nc), self.width, frame=frame)
    pe_kv = sincos_2d(frame, self.width, frame=frame)
    h, dh = self.num_heads, self.width // self.num_heads
    split = lambda x: x.reshape(b, -1, h, dh)
    logits = jnp.einsum("bqhd,bkhd->bhqk", split(q + pe_q), split(kv + pe_kv),
                        preferred_element_type=jnp.float32) / math.sqrt(dh)
    attn = jax.nn.softmax(logits, axis=-1).astype(kv.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", attn, split(kv))
    return out.reshape(b, nc, self.width)
