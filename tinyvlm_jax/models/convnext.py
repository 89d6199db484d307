"""ConvNeXt-V2 (FCMAE family) in Flax Linen, matching transformers' `ConvNextV2Model`.

Channels-last throughout: `[N, H, W, 3]` ImageNet-normalised pixels in, `last_hidden_state`
`[N, h, w, C_last]` out (transformers' NCHW output, transposed). Parameter names follow
transformers' module names so the conversion table (`convert/convnext.py`) reads one-to-one.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from tinyvlm_jax.models.config import ConvNextV2Config
from tinyvlm_jax.quantize import dense, patch_conv

# transformers hard-codes eps=1e-6 for the stem, downsampling and block LayerNorms; only the
# final (pooler) LayerNorm reads `config.layer_norm_eps`.
_INNER_LN_EPS = 1e-6

_ACTIVATIONS = {
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "gelu_new": lambda x: nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: nn.gelu(x, approximate=True),
    "relu": nn.relu,
    "silu": nn.silu,
}


def activation(name: str):
  if name not in _ACTIVATIONS:
    raise ValueError(f"ConvNextV2Config.hidden_act={name!r} is not supported; use one of {sorted(_ACTIVATIONS)}")
  return _ACTIVATIONS[name]


def _dense(cfg: ConvNextV2Config, features: int, in_features: int, name: str) -> nn.Module:
  """nn.Dense, or its weight-only quantized twin when `cfg.quantization` is set and the
  [features, in_features] weight fits the packing (as `quantize.quantize_params` decides)."""
  return dense(features, in_features, cfg.quantization, dtype=jnp.dtype(cfg.dtype), name=name)


class GRN(nn.Module):
  """Global response normalisation (transformers `ConvNextV2GRN`), channels-last."""
  dim: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):  # [N, H, W, C] -> [N, H, W, C]
    gamma = self.param("weight", nn.initializers.zeros, (self.dim,), jnp.float32)
    beta = self.param("bias", nn.initializers.zeros, (self.dim,), jnp.float32)
    x32 = x.astype(jnp.float32)
    gx = jnp.sqrt(jnp.sum(jnp.square(x32), axis=(1, 2), keepdims=True))  # [N, 1, 1, C]: L2 norm over space
    nx = gx / (jnp.mean(gx, axis=-1, keepdims=True) + 1e-6)
    return (gamma * (x32 * nx) + beta + x32).astype(self.dtype)


class DepthwiseConv(nn.Module):
  """nn.Conv(dim, (k, k), padding k // 2, feature_group_count=dim), with its parameter names,
  shapes and init (kernel [k, k, 1, dim], bias [dim]).

  On CPU it runs as a sum of k * k shifted slices times per-channel weights, which XLA fuses into
  one loop: measured for ConvNeXt-V2-Tiny's 7x7 convs at 224 px (2 cores), 1.1 ms against 25 ms
  for XLA:CPU's grouped convolution at 56x56x96, and about 17 ms against 214 ms for all 18 layers.
  Elsewhere the grouped convolution.
  """
  dim: int
  kernel_size: int = 7
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):  # [N, H, W, C] -> [N, H, W, C]
    k = self.kernel_size
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (k, k, 1, self.dim), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (self.dim,), jnp.float32)
    x, kernel, bias = x.astype(self.dtype), kernel.astype(self.dtype), bias.astype(self.dtype)
    pad = ((k // 2, k // 2), (k // 2, k // 2))

    def grouped(x, kernel):
      return jax.lax.conv_general_dilated(x, kernel, (1, 1), pad, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                          feature_group_count=self.dim)

    def shifted(x, kernel):
      _, h, w, _ = x.shape
      xp = jnp.pad(x, ((0, 0), *pad, (0, 0)))
      out = xp[:, :h, :w] * kernel[0, 0, 0]
      for i in range(k):
        for j in range(k):
          if i or j:
            out = out + xp[:, i:i + h, j:j + w] * kernel[i, j, 0]
      return out
    return jax.lax.platform_dependent(x, kernel, cpu=shifted, default=grouped) + bias


class ConvNextV2Embeddings(nn.Module):
  """Stem: patchify conv (kernel = stride = patch_size) and a channels-last LayerNorm."""
  config: ConvNextV2Config

  @nn.compact
  def __call__(self, pixel_values):  # [N, H, W, 3] -> [N, H/p, W/p, C0]
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    p = cfg.patch_size
    x = patch_conv(cfg.hidden_sizes[0], p, pixel_values.shape[-1], cfg.quantization, dtype=dtype,
                   name="patch_embeddings")(pixel_values)
    return nn.LayerNorm(epsilon=_INNER_LN_EPS, dtype=dtype, name="layernorm")(x)


class ConvNextV2Layer(nn.Module):
  """One block: depthwise 7x7 conv, LayerNorm, Dense 4C, GELU, GRN, Dense C, residual."""
  config: ConvNextV2Config
  dim: int

  @nn.compact
  def __call__(self, x):  # [N, h, w, C] -> [N, h, w, C]
    dtype = jnp.dtype(self.config.dtype)
    y = DepthwiseConv(self.dim, dtype=dtype, name="dwconv")(x)
    y = nn.LayerNorm(epsilon=_INNER_LN_EPS, dtype=dtype, name="layernorm")(y)
    y = _dense(self.config, 4 * self.dim, self.dim, "pwconv1")(y)  # [N, h, w, C] -> [N, h, w, 4C]
    y = activation(self.config.hidden_act)(y)
    y = GRN(4 * self.dim, dtype=dtype, name="grn")(y)
    y = _dense(self.config, self.dim, 4 * self.dim, "pwconv2")(y)  # [N, h, w, 4C] -> [N, h, w, C]
    return x + y  # no layer scale in V2; drop path is the identity at inference


class ConvNextV2Stage(nn.Module):
  """Optional downsampling (LayerNorm, 2x2 stride-2 conv), then `depth` blocks."""
  config: ConvNextV2Config
  index: int

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    dim = cfg.hidden_sizes[self.index]
    if self.index > 0:  # [N, h, w, C_prev] -> [N, h/2, w/2, C]
      x = nn.LayerNorm(epsilon=_INNER_LN_EPS, dtype=dtype, name="downsampling_layernorm")(x)
      x = patch_conv(dim, 2, x.shape[-1], cfg.quantization, dtype=dtype, name="downsampling_conv")(x)
    for j in range(cfg.depths[self.index]):
      x = ConvNextV2Layer(cfg, dim, name=f"layers_{j}")(x)
    return x


class ConvNextV2(nn.Module):
  """ConvNeXt-V2 backbone: `pixel_values [N, H, W, 3]` -> `last_hidden_state [N, h, w, C_last]`.

  It also holds transformers' final `layernorm` (used only for the pooled output), so the
  checkpoint maps one-to-one; `pooled` applies it, `__call__` does not.
  """
  config: ConvNextV2Config

  def setup(self):
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    self.embeddings = ConvNextV2Embeddings(cfg)
    self.stages = [ConvNextV2Stage(cfg, i) for i in range(len(cfg.depths))]
    self.layernorm = nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=dtype)

  def __call__(self, pixel_values):
    if pixel_values.shape[-1] != self.config.num_channels:
      raise ValueError(f"ConvNextV2 expects NHWC pixels with {self.config.num_channels} channels, "
                       f"got shape {pixel_values.shape}")
    x = self.embeddings(pixel_values.astype(jnp.dtype(self.config.dtype)))
    for stage in self.stages:
      x = stage(x)  # [N, 224, 224, 3] -> [N, 56, 56, 96] -> ... -> [N, 7, 7, 768]
    if self.is_initializing():
      self.pooled(x)  # creates the final LayerNorm's parameters
    return x

  def pooled(self, last_hidden_state):
    """transformers' `pooler_output`: LayerNorm of the spatial mean. [N, h, w, C] -> [N, C]."""
    return self.layernorm(jnp.mean(last_hidden_state, axis=(1, 2)))
