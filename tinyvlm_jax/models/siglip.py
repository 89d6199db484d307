"""SigLIP vision tower in Flax Linen, matching transformers' `SiglipVisionModel` without the MAP head.

`[N, H, W, 3]` pixels in [-1, 1] (NHWC) -> patch embedding (a Conv with kernel = stride =
patch) + learned position embedding -> pre-LN encoder layers -> `post_layernorm`.
Parameter names follow transformers' module names (`embeddings/patch_embedding`,
`encoder/layers_3/self_attn/q_proj`, ...) so `convert/siglip.py` reads one-to-one.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from tinyvlm_jax import cpu_kernels
from tinyvlm_jax.models.config import SiglipConfig
from tinyvlm_jax.quantize import QuantDense, patch_conv

_ACTIVATIONS = {
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "gelu_new": lambda x: nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * nn.sigmoid(1.702 * x),
    "relu": nn.relu,
}


def activation(name: str):
  if name not in _ACTIVATIONS:
    raise ValueError(f"SiglipConfig.hidden_act={name!r} is not supported; use one of {sorted(_ACTIVATIONS)}")
  return _ACTIVATIONS[name]


def _dense(cfg: SiglipConfig, features: int, name: str) -> nn.Module:
  """nn.Dense, or its weight-only quantized twin when `cfg.quantization` is set; with bfloat16
  operands when `cfg.matmul_dtype` says so (`cpu_kernels.matmul_dot_general`)."""
  dtype = jnp.dtype(cfg.dtype)
  if cfg.quantization != "none":
    return QuantDense(features, cfg.quantization, dtype=dtype, matmul_dtype=cfg.matmul_dtype, name=name)
  return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32, kernel_init=nn.initializers.xavier_uniform(),
                  dot_general=None if cfg.matmul_dtype == "float32" else cpu_kernels.matmul_dot_general(cfg.matmul_dtype),
                  name=name)


def _layer_norm(cfg: SiglipConfig, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.float32, name=name)


class SiglipEmbeddings(nn.Module):
  """Patchify conv plus one learned position vector per patch (row-major patch order)."""
  config: SiglipConfig

  @nn.compact
  def __call__(self, pixel_values):  # [N, H, W, C] -> [N, P, D]
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    p = cfg.patch_size
    x = patch_conv(cfg.hidden_size, p, pixel_values.shape[-1], cfg.quantization, dtype=dtype, name="patch_embedding",
                   param_dtype=jnp.float32, kernel_init=nn.initializers.lecun_normal())(pixel_values.astype(dtype))
    n, gh, gw, d = x.shape
    if gh * gw != cfg.num_patches:
      raise ValueError(f"SigLIP: a {pixel_values.shape[1]}x{pixel_values.shape[2]} image gives {gh}x{gw} patches, "
                       f"but the position embedding has {cfg.num_patches} (image_size={cfg.image_size}, "
                       f"patch_size={cfg.patch_size}); resize the images to {cfg.image_size}x{cfg.image_size}")
    x = x.reshape(n, gh * gw, d)  # [N, g, g, D] -> [N, P, D]
    pos = nn.Embed(cfg.num_patches, cfg.hidden_size, dtype=dtype, param_dtype=jnp.float32,
                   embedding_init=nn.initializers.normal(cfg.hidden_size ** -0.5), name="position_embedding")
    return x + pos.embedding.astype(dtype)[None]


class SiglipAttention(nn.Module):
  """Multi-head self-attention; q/k/v/out are plain Dense layers of width hidden_size."""
  config: SiglipConfig

  @nn.compact
  def __call__(self, x):  # [N, P, D] -> [N, P, D]
    cfg = self.config
    heads = cfg.num_attention_heads
    if cfg.hidden_size % heads:
      raise ValueError(f"SiglipConfig: hidden_size={cfg.hidden_size} is not divisible by "
                       f"num_attention_heads={heads}")
    n, p, d = x.shape
    split = lambda t: t.reshape(n, p, heads, d // heads)  # [N, P, D] -> [N, P, heads, head_dim]
    q = split(_dense(cfg, d, "q_proj")(x))
    k = split(_dense(cfg, d, "k_proj")(x))
    v = split(_dense(cfg, d, "v_proj")(x))
    out = attention(q, k, v, (d // heads) ** -0.5)  # [N, P, heads, head_dim]
    return _dense(cfg, d, "out_proj")(out.reshape(n, p, d))


def attention(q, k, v, scale: float):
  """q, k, v [N, P, heads, head_dim] -> softmax(q k^T * scale) v, [N, P, heads, head_dim].

  When the default backend is the CPU (float32, head_dim a multiple of 16), the `attention` kernel
  of `tinyvlm_jax.cpu_kernels`: measured at full size (5 views of 576 patches, 12 heads, 2 cores)
  42-49 ms per layer against XLA's 104-127 ms (timed in turn). Its gradient is XLA's (it
  recomputes the forward). Elsewhere `attention_xla`, with XLA's own gradient.
  """
  if jax.default_backend() == "cpu" and cpu_kernels.fits(q, k, v, multiple=16):
    return _attention_cpu(q, k, v, scale)
  return attention_xla(q, k, v, scale)


def attention_xla(q, k, v, scale: float):
  """`attention` in XLA ops: heads-major operands, softmax in float32 normalised after the value
  product (on XLA:CPU about 2x faster than jax.nn.dot_product_attention: fewer passes over the
  [P, P] scores)."""
  q, k, v = (jnp.swapaxes(t, 1, 2) for t in (q, k, v))  # [N, heads, P, head_dim]
  logits = jnp.einsum("nhqd,nhkd->nhqk", q, k, preferred_element_type=jnp.float32) * scale
  shift = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))  # constant for the gradient, as in qwen2
  weights = jnp.exp(logits - shift)  # [N, heads, P, P]
  out = jnp.einsum("nhqk,nhkd->nhqd", weights.astype(v.dtype), v) / jnp.sum(weights, -1, keepdims=True).astype(v.dtype)
  return jnp.swapaxes(out, 1, 2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _attention_cpu(q, k, v, scale: float):
  kernel = lambda q, k, v: cpu_kernels.call("attention", q.shape, q, k, v, scale=np.float32(scale))
  return jax.lax.platform_dependent(q, k, v, cpu=kernel, default=functools.partial(attention_xla, scale=scale))


def _attention_cpu_fwd(q, k, v, scale: float):
  return _attention_cpu(q, k, v, scale), (q, k, v)


def _attention_cpu_bwd(scale: float, residuals, grad):
  return jax.vjp(functools.partial(attention_xla, scale=scale), *residuals)[1](grad)


_attention_cpu.defvjp(_attention_cpu_fwd, _attention_cpu_bwd)


class SiglipMLP(nn.Module):
  config: SiglipConfig

  @nn.compact
  def __call__(self, x):  # [N, P, D] -> [N, P, D]
    cfg = self.config
    x = _dense(cfg, cfg.intermediate_size, "fc1")(x)  # [N, P, D] -> [N, P, F]
    x = activation(cfg.hidden_act)(x)
    return _dense(cfg, cfg.hidden_size, "fc2")(x)  # [N, P, F] -> [N, P, D]


class SiglipEncoderLayer(nn.Module):
  """Pre-LN transformer block: x + attn(LN1(x)), then x + mlp(LN2(x))."""
  config: SiglipConfig

  @nn.compact
  def __call__(self, x):  # [N, P, D] -> [N, P, D]
    cfg = self.config
    x = x + SiglipAttention(cfg, name="self_attn")(_layer_norm(cfg, "layer_norm1")(x))
    x = x + SiglipMLP(cfg, name="mlp")(_layer_norm(cfg, "layer_norm2")(x))
    return checkpoint_name(x, "siglip_layer_output")


class SiglipEncoder(nn.Module):
  config: SiglipConfig

  @nn.compact
  def __call__(self, x):  # [N, P, D] -> ([N, P, D], (L + 1) x [N, P, D])
    hidden_states = [x]
    for i in range(self.config.num_hidden_layers):
      x = SiglipEncoderLayer(self.config, name=f"layers_{i}")(x)
      hidden_states.append(x)
    return x, tuple(hidden_states)


class SiglipVisionTower(nn.Module):
  """transformers' `SiglipVisionModel` (vision_use_head=False) on NHWC pixels.

  Returns `(last_hidden_state, hidden_states)`: the last layer after `post_layernorm`
  `[N, P, D]`, and the embeddings output followed by every encoder layer's output (before
  `post_layernorm`), as transformers' `output_hidden_states=True` gives them.
  """
  config: SiglipConfig

  @nn.compact
  def __call__(self, pixel_values):  # [N, H, W, 3] -> [N, P, D]
    cfg = self.config
    if pixel_values.ndim != 4 or pixel_values.shape[-1] != cfg.num_channels:
      raise ValueError(f"SigLIP expects NHWC pixels [N, H, W, {cfg.num_channels}], got shape {pixel_values.shape}")
    x = SiglipEmbeddings(cfg, name="embeddings")(pixel_values)
    x, hidden_states = SiglipEncoder(cfg, name="encoder")(x)
    return _layer_norm(cfg, "post_layernorm")(x), hidden_states
