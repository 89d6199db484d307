"""Weight-only int8 / int4 quantization of the LLM, the vision tower, the CNN and the heads.

`quantize_params(params, config, mode)` turns the float32 params of a trained model into
quantized ones and `quantized_config(config, mode)` sets the `quantization` fields that make
`Qwen2ForCausalLM` / `SiglipVisionTower` / `ConvNextV2` / the heads build `QuantDense` /
`QuantEmbed` / `QuantPatchConv` layers instead of `nn.Dense` / `nn.Embed` / `nn.Conv`. The patchify
convs (kernel = stride: SigLIP's patch embedding, ConvNeXt's stem and downsampling, the pooler) are
Dense layers over patches and are quantized as such. In the CNN and the heads, only the layers whose
widths fit the packing (`packable`) are quantized. Norms, biases, the depthwise convs and position
embeddings stay float32.

Modes: `int8`, one scale per output channel (symmetric, q in [-127, 127]); `int4` (group 128),
`int4_g64`, `int4_g32`: one scale per output channel and group of G inputs (q in [-7, 7]), stored
as bfloat16 (rounded up, so |w| <= 7 * scale still holds): half the bytes of float32 scales (the
full-size LLM's int4 weights: 255 MB instead of 263), for a relative change of less than 2^-7 in a
scale, far below the int4 step itself (int8's per-channel scales, 0.3% of its weight bytes, stay
float32).
The tied embedding is quantized per row, which is per output channel of the LM head.

Layout (N outputs, K inputs; rows of 8 outputs are tiled so the CPU kernel streams them):
  int8  qkernel int8  [N/8, K/8, 8, 8]    scale f32 [N]
  int4  qkernel uint8 [N/8, K/32, 8, 16]  scale bf16 [N, K/G]; in each row's 16 bytes of a tile,
        byte b holds column b (low nibble) and b + 16 (high nibble), stored as q + 8.
Dense layers hold {"qkernel", "scale"[, "bias"]}; the embedding holds {"qembedding", "scale"}.

Compute: on CPU, a decode step (at most `GEMV_MAX_ROWS` rows) calls the kernels of
`tinyvlm_jax.cpu_kernels` (built with g++ on first use, cached): they read the packed weights
once and dequantize in registers (int4: multiply the nibbles by x rounded to int16 per group); the
layers that share an input (q, k and v; gate and up: `quant_dense_group`) run as one kernel call.
XLA:CPU itself would first convert an int8 dot operand to a float32 array in memory (about 0.3 G
weights/s here), slower than float32 weights. Longer inputs
(prefill, the vision tower) dequantize each weight once per call and use XLA's dot. On other
platforms, and on CPUs without the kernels, everything takes the dequantize-and-dot path,
which XLA fuses on accelerators.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tinyvlm_jax import cpu_kernels

MODES = ("none", "int8", "int4", "int4_g128", "int4_g64", "int4_g32")
INT4_DEFAULT_GROUP = 128
TILE_ROWS = 8
GEMV_MAX_ROWS = cpu_kernels.GEMV_MAX_ROWS


@dataclasses.dataclass(frozen=True)
class QuantMode:
  bits: int          # 8 or 4
  group_size: int    # int4 group size along the inputs (0 for int8: per channel)

  def group_for(self, k: int) -> int:
    """The group size used for K inputs: the mode's, or K itself when K is smaller."""
    return min(self.group_size, k)


def parse_mode(mode: str) -> QuantMode | None:
  """'none' -> None, 'int8' -> QuantMode(8, 0), 'int4' -> QuantMode(4, 128), 'int4_g64' -> QuantMode(4, 64)."""
  if mode not in MODES:
    raise ValueError(f"quantization mode {mode!r} is not supported; use one of {list(MODES)}")
  if mode == "none":
    return None
  if mode == "int8":
    return QuantMode(8, 0)
  m = re.fullmatch(r"int4(?:_g(\d+))?", mode)
  return QuantMode(4, int(m.group(1) or INT4_DEFAULT_GROUP))


# ---------------------------------------------------------------------------------------
# Packing (numpy, done once) and unpacking (jnp, inside the model).

def packable(n: int, k: int, mode: QuantMode | None = None) -> bool:
  """Whether an [N, K] weight fits the packed layouts: N % 8 == 0, K % 32 == 0 and, for int4
  `mode`, whole groups (K = 192 does not fit groups of 128)."""
  return n % TILE_ROWS == 0 and k % 32 == 0 and (mode is None or mode.bits == 8 or k % mode.group_for(k) == 0)


def _check_dims(n: int, k: int, what: str) -> None:
  if not packable(n, k):
    raise ValueError(f"{what}: a quantized weight needs outputs N % {TILE_ROWS} == 0 and inputs K % 32 == 0, "
                     f"got N={n}, K={k}")


def quantize_int8(w: np.ndarray, what: str = "weight") -> tuple[np.ndarray, np.ndarray]:
  """w [N, K] (one row per output) -> (q int8 [N/8, K/8, 8, 8], scale f32 [N]), |w - q*scale| <= scale/2."""
  w = np.asarray(w, np.float32)
  n, k = w.shape
  _check_dims(n, k, what)
  scale = np.abs(w).max(axis=1) / 127.0
  scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
  q = np.clip(np.rint(w / scale[:, None]), -127, 127).astype(np.int8)
  return tile_int8(q), scale


def bfloat16_ceil(x: np.ndarray) -> np.ndarray:
  """Positive finite float32 -> the smallest bfloat16 >= each value (exact: a bfloat16 is the top
  16 bits of a float32)."""
  bits = np.asarray(x, np.float32).view(np.uint32)
  up = ((bits.astype(np.uint64) + 0xFFFF) & 0xFFFF0000).astype(np.uint32)
  return up.view(np.float32).astype(jnp.bfloat16)


def quantize_int4(w: np.ndarray, group_size: int, what: str = "weight") -> tuple[np.ndarray, np.ndarray]:
  """w [N, K] -> (packed uint8 [N/8, K/32, 8, 16], scale bf16 [N, K/G]), |w - q*scale| <= scale/2."""
  w = np.asarray(w, np.float32)
  n, k = w.shape
  _check_dims(n, k, what)
  if k % group_size or group_size % 32:
    raise ValueError(f"{what}: int4 group size {group_size} must divide K={k} and be a multiple of 32")
  groups = w.reshape(n, k // group_size, group_size)
  scale = np.abs(groups).max(axis=2) / 7.0
  scale = bfloat16_ceil(np.where(scale > 0, scale, 1.0))
  q = np.clip(np.rint(groups / scale.astype(np.float32)[..., None]), -7, 7).astype(np.int8).reshape(n, k)
  return pack_int4(q), scale


def tile_int8(q: np.ndarray) -> np.ndarray:
  """[N, K] -> [N/8, K/8, 8, 8]: tile (i, j) = rows 8i.., columns 8j.."""
  n, k = q.shape
  return np.ascontiguousarray(q.reshape(n // 8, 8, k // 8, 8).transpose(0, 2, 1, 3))


def pack_int4(q: np.ndarray) -> np.ndarray:
  """int values in [-8, 7], [N, K] -> uint8 [N/8, K/32, 8, 16] (see the module docstring)."""
  n, k = q.shape
  nib = (np.asarray(q, np.int16) + 8).astype(np.uint8).reshape(n // 8, 8, k // 32, 2, 16)
  packed = nib[:, :, :, 0] | (nib[:, :, :, 1] << 4)                 # [N/8, 8, K/32, 16]
  return np.ascontiguousarray(packed.transpose(0, 2, 1, 3))


def untile_int8(t):
  """[N/8, K/8, 8, 8] -> [N, K] (jnp or numpy)."""
  a, b = t.shape[:2]
  return t.transpose(0, 2, 1, 3).reshape(a * 8, b * 8)


def unpack_int4(p):
  """uint8 [N/8, K/32, 8, 16] -> int8 [N, K] with values in [-8, 7] (jnp or numpy)."""
  xp = jnp if isinstance(p, jax.Array) else np
  a, b = p.shape[:2]
  nib = xp.concatenate([p & 15, p >> 4], axis=-1).astype(xp.int8) - 8   # [N/8, K/32, 8, 32]
  return nib.transpose(0, 2, 1, 3).reshape(a * 8, b * 32)


def dequantize(qkernel, scale, dtype=jnp.float32):
  """Quantized weight -> float [N, K] (jnp), the kind told by the dtype of qkernel."""
  if qkernel.dtype == jnp.int8:
    return untile_int8(qkernel).astype(dtype) * scale.astype(dtype)[:, None]
  q = unpack_int4(qkernel).astype(dtype)
  n, k = q.shape
  groups = scale.shape[1]
  return (q.reshape(n, groups, k // groups) * scale.astype(dtype)[..., None]).reshape(n, k)


def quantized_matmul(x, qkernel, scale):
  """x [..., K] @ W^T for a quantized W [N, K] -> [..., N] in x's dtype."""
  return quantized_matmuls(x, [(qkernel, scale)])[0]


def quantized_matmuls(x, weights, matmul_dtype: str = "float32"):
  """x [..., K] @ W_i^T for quantized W_i [N_i, K] (`weights`: (qkernel, scale) pairs, all int8 or all
  int4 with one group size) -> a list of [..., N_i] in x's dtype. With matmul_dtype "bfloat16", a
  product of more than GEMV_MAX_ROWS rows takes x and the dequantized W_i in bfloat16 and sums in
  float32 (as `cpu_kernels.matmul_dot_general` does for float32 weights).

  A decode step on CPU reads every W_i in one kernel call (the projections of one input, such as an
  attention layer's q, k and v): each row's result is the same as from its own call, and the call's
  fixed costs (the thread pool's start and finish, the memory stream's ramp-up, int4's rounding of
  x) are paid once.
  """
  int8 = weights[0][0].dtype == jnp.int8
  ns = [w[0].shape[0] * TILE_ROWS for w in weights]
  k = weights[0][0].shape[1] * (8 if int8 else 32)
  for i, (qkernel, scale) in enumerate(weights):
    if ((qkernel.dtype == jnp.int8) != int8 or qkernel.shape[1] * (8 if int8 else 32) != k
        or scale.shape[1:] != weights[0][1].shape[1:]):
      raise ValueError(f"quantized_matmuls: weight {i} ({qkernel.dtype} {qkernel.shape}, scale {scale.shape}) is not "
                       f"of weight 0's kind ({weights[0][0].dtype}, K={k}, scale {weights[0][1].shape}); one call "
                       "takes weights of one kind, K and group size")
  lead = x.shape[:-1]
  rows = int(np.prod(lead, dtype=np.int64))
  flat = [a for w in weights for a in w]
  pairs = lambda ops: zip(ops[0::2], ops[1::2])

  dot = cpu_kernels.matmul_dot_general(matmul_dtype)

  def product(x2, w):  # x2 [M, K] @ w [N, K]^T for a dequantized w, in x2's dtype
    return dot(x2, w.astype(x2.dtype), (((1,), (1,)), ((), ())))

  def xla_path(x2, *ops):
    return [product(x2, dequantize(q, sc, x2.dtype)) for q, sc in pairs(ops)]

  def cpu_path(x2, *ops):
    if rows <= GEMV_MAX_ROWS:
      return cpu_kernels.call_results("gemv_i8" if int8 else "gemv_i4", [(rows, n) for n in ns],
                                      x2.astype(jnp.float32), *ops)
    # x2 goes in first so that each weight is dequantized only once its input exists (see DequantI8).
    return [product(x2, cpu_kernels.call("dequant_i8" if int8 else "dequant_i4", (n, k), x2, q, sc))
            for n, (q, sc) in zip(ns, pairs(ops))]

  x2 = x.reshape(rows, k)
  if cpu_kernels.available():
    ys = jax.lax.platform_dependent(x2, *flat, cpu=cpu_path, default=xla_path)
  else:
    ys = xla_path(x2, *flat)
  return [y.astype(x.dtype).reshape(lead + (n,)) for y, n in zip(ys, ns)]


# ---------------------------------------------------------------------------------------
# Layers.

def quantized_shapes(n: int, k: int, mode: QuantMode) -> dict[str, tuple[tuple[int, ...], Any]]:
  """Parameter name -> (shape, dtype) of a quantized [N, K] weight."""
  if not packable(n, k, mode):
    raise ValueError(f"a quantized weight needs outputs N % {TILE_ROWS} == 0, inputs K % 32 == 0 and, for int4, "
                     f"K a multiple of the group size {mode.group_size}; got N={n}, K={k}")
  if mode.bits == 8:
    return {"q": ((n // 8, k // 8, 8, 8), jnp.int8), "scale": ((n,), jnp.float32)}
  return {"q": ((n // 8, k // 32, 8, 16), jnp.uint8), "scale": ((n, k // mode.group_for(k)), jnp.bfloat16)}


def _quantized_params(module: nn.Module, features: int, in_features: int, mode: str, use_bias: bool):
  """Declares a quantized Dense's params in `module`'s scope: (qkernel, scale, bias or None)."""
  shapes = quantized_shapes(features, in_features, parse_mode(mode))
  (q_shape, q_dtype), (s_shape, s_dtype) = shapes["q"], shapes["scale"]
  qkernel = module.param("qkernel", nn.initializers.zeros_init(), q_shape, q_dtype)
  scale = module.param("scale", nn.initializers.ones_init(), s_shape, s_dtype)
  bias = module.param("bias", nn.initializers.zeros_init(), (features,), jnp.float32) if use_bias else None
  return qkernel, scale, bias


def _apply_quantized(x, params, dtype, matmul_dtype: str = "float32") -> list:
  """x through the quantized Dense layers whose params are `params` ((qkernel, scale, bias or None)
  each), with one `quantized_matmuls` call: [x @ W_i^T (+ bias_i)] in `dtype`."""
  ys = quantized_matmuls(x.astype(dtype), [(qkernel, scale) for qkernel, scale, _ in params], matmul_dtype)
  return [y if bias is None else y + bias.astype(dtype) for y, (_, _, bias) in zip(ys, params)]


def _quantized_dense(module: nn.Module, x, features: int, mode: str, use_bias: bool, dtype,
                     matmul_dtype: str = "float32"):
  """The body of QuantDense, in `module`'s scope: params qkernel, scale[, bias]."""
  return _apply_quantized(x, [_quantized_params(module, features, x.shape[-1], mode, use_bias)], dtype,
                          matmul_dtype)[0]


class QuantDense(nn.Module):
  """`nn.Dense` with a weight-only quantized kernel (params qkernel, scale[, bias]); see the module doc."""
  features: int
  mode: str
  use_bias: bool = True
  dtype: Any = jnp.float32
  matmul_dtype: str = "float32"  # see quantized_matmuls

  @nn.compact
  def __call__(self, x):  # [..., K] -> [..., N]
    return _quantized_dense(self, x, self.features, self.mode, self.use_bias, self.dtype, self.matmul_dtype)


class QuantWeights(nn.Module):
  """A QuantDense's params (qkernel, scale[, bias]) without its product: under the layer's name they
  are the same params as QuantDense's. `quant_dense_group` applies several of them at once."""
  features: int
  in_features: int
  mode: str
  use_bias: bool = True

  @nn.compact
  def __call__(self):
    return _quantized_params(self, self.features, self.in_features, self.mode, self.use_bias)


def quant_dense_group(x, layers, dtype, matmul_dtype: str = "float32") -> list:
  """The QuantDense layers `layers` (QuantWeights) applied to one input x: [layer(x), ...], with one
  `quantized_matmuls` call for all of them (one kernel call in a decode step on CPU)."""
  return _apply_quantized(x, [layer() for layer in layers], dtype, matmul_dtype)


def patchify(x, patch: tuple[int, int]):
  """[N, H, W, C] -> [N, H/ph, W/pw, ph*pw*C]: each non-overlapping patch as one vector, in the
  order of a flattened conv kernel [ph, pw, C, F]. A partial patch at the edge is dropped (VALID)."""
  (ph, pw), (n, h, w, c) = patch, x.shape
  x = x[:, :h - h % ph, :w - w % pw]
  x = x.reshape(n, h // ph, ph, w // pw, pw, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(n, h // ph, w // pw, ph * pw * c)


class QuantPatchConv(nn.Module):
  """`nn.Conv(features, patch, strides=patch, padding="VALID")` with a weight-only quantized kernel:
  such a conv is one Dense over each non-overlapping patch (`patchify`), and that Dense's weight
  [F, ph*pw*C] is what is packed (params qkernel, scale, bias)."""
  features: int
  patch: tuple[int, int]
  mode: str
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):  # [N, H, W, C] -> [N, H/ph, W/pw, F]
    return _quantized_dense(self, patchify(x, self.patch), self.features, self.mode, True, self.dtype)


def dense(features: int, in_features: int, mode: str, *, dtype, name: str, **dense_kwargs) -> nn.Module:
  """nn.Dense, or QuantDense when `mode` is set and the [features, in_features] weight fits the
  packing (as `quantize_params` decides for the layers it may leave float)."""
  if mode != "none" and packable(features, in_features, parse_mode(mode)):
    return QuantDense(features, mode, dtype=dtype, name=name)
  return nn.Dense(features, dtype=dtype, name=name, **dense_kwargs)


def patch_conv(features: int, patch: int, in_features: int, mode: str, *, dtype, name: str,
               **conv_kwargs) -> nn.Module:
  """nn.Conv with kernel = stride = patch (VALID), or QuantPatchConv when `mode` is set and the
  conv's Dense [features, patch * patch * in_features] fits the packing (as `quantize_params` decides)."""
  if mode != "none" and packable(features, patch * patch * in_features, parse_mode(mode)):
    return QuantPatchConv(features, (patch, patch), mode, dtype=dtype, name=name)
  return nn.Conv(features, (patch, patch), strides=(patch, patch), padding="VALID", dtype=dtype, name=name,
                 **conv_kwargs)


class QuantEmbed(nn.Module):
  """`nn.Embed` with a quantized table (params qembedding, scale): rows by id, and `attend` (tied LM head)."""
  num_embeddings: int
  features: int
  mode: str
  dtype: Any = jnp.float32

  def setup(self):
    shapes = quantized_shapes(self.num_embeddings, self.features, parse_mode(self.mode))
    (q_shape, q_dtype), (s_shape, s_dtype) = shapes["q"], shapes["scale"]
    self.qembedding = self.param("qembedding", nn.initializers.zeros_init(), q_shape, q_dtype)
    self.scale = self.param("scale", nn.initializers.ones_init(), s_shape, s_dtype)

  def __call__(self, ids):  # [...] int -> [..., D]
    tile, row = ids // TILE_ROWS, ids % TILE_ROWS
    parts = self.qembedding[tile, :, row, :]                             # [..., K/8, 8] or [..., K/32, 16]
    scale = self.scale[ids].astype(self.dtype)
    if self.qembedding.dtype == jnp.int8:
      return parts.reshape(ids.shape + (self.features,)).astype(self.dtype) * scale[..., None]
    nib = jnp.concatenate([parts & 15, parts >> 4], axis=-1).astype(jnp.int8) - 8   # [..., K/32, 32]
    groups = scale.shape[-1]
    q = nib.reshape(ids.shape + (groups, self.features // groups)).astype(self.dtype)
    return (q * scale[..., None]).reshape(ids.shape + (self.features,))

  def attend(self, x):  # [..., D] -> [..., V]
    return quantized_matmul(x.astype(self.dtype), self.qembedding, self.scale)


# ---------------------------------------------------------------------------------------
# Params and config transforms.

def _quantize_weight(w_t: np.ndarray, mode: QuantMode, what: str) -> tuple[np.ndarray, np.ndarray]:
  if mode.bits == 8:
    return quantize_int8(w_t, what)
  return quantize_int4(w_t, mode.group_for(w_t.shape[1]), what)


# The patchify convs (kernel = stride, VALID) that `patch_conv` builds: SigLIP's patch embedding,
# ConvNeXt's stem and downsampling, the pooler. Quantized as QuantPatchConv where they fit the packing.
PATCH_CONVS = ("patch_embedding", "patch_embeddings", "downsampling_conv", "conv")


def _quantize_tree(tree: dict, mode: QuantMode, path: tuple[str, ...], embeddings: bool,
                   only_packable: bool = False) -> dict:
  """Quantizes every Dense kernel under `tree` (and the embedding table when `embeddings`), and the
  patch convs (`PATCH_CONVS`, 4-D kernels [ph, pw, C, F]) that fit the packing; with
  `only_packable`, Dense kernels that do not fit stay float too (elsewhere they are an error)."""
  out = {}
  for name, node in tree.items():
    where = path + (name,)
    has_kernel = isinstance(node, dict) and "kernel" in node
    dense = has_kernel and np.ndim(node["kernel"]) == 2
    conv = has_kernel and np.ndim(node["kernel"]) == 4 and name in PATCH_CONVS
    if conv:  # [ph, pw, C, F] -> the Dense [ph*pw*C, F] of QuantPatchConv
      node = {**node, "kernel": np.reshape(node["kernel"], (-1, np.shape(node["kernel"])[-1]))}
    if (dense or conv) and (only_packable or conv) and not packable(*np.shape(node["kernel"])[::-1], mode):
      out[name] = tree[name]
    elif dense or conv:
      q, scale = _quantize_weight(np.asarray(node["kernel"]).T, mode, "/".join(where))  # Flax [K, N] -> [N, K]
      out[name] = {"qkernel": q, "scale": scale, **({"bias": node["bias"]} if "bias" in node else {})}
    elif isinstance(node, dict) and embeddings and name == "embed_tokens" and "embedding" in node:
      q, scale = _quantize_weight(np.asarray(node["embedding"]), mode, "/".join(where))
      out[name] = {"qembedding": q, "scale": scale}
    elif isinstance(node, dict):
      out[name] = _quantize_tree(node, mode, where, embeddings, only_packable)
    else:
      out[name] = node
  return out


def quantize_params(params: dict, config, mode: str) -> dict:
  """Float params -> quantized params for `quantized_config(config, mode)`.

  `config` is a TinyVLMConfig (quantizes params["vision"], params["llm"], the heads and, when the
  model has one, params["cnn"]), or a QwenConfig, SiglipConfig or ConvNextV2Config (params of that
  tower alone). The CNN's and the heads' Dense layers, and every patch conv, are quantized where
  they fit the packing (`packable`); the small early-stage layers of a reduced preset stay float.
  Returns new numpy leaves for the quantized layers and the same objects elsewhere; mode "none"
  returns `params` itself.
  """
  from tinyvlm_jax.models.config import ConvNextV2Config, QwenConfig, SiglipConfig, TinyVLMConfig
  qmode = parse_mode(mode)
  if qmode is None:
    return params
  if set(params) == {"params"}:
    return {"params": quantize_params(params["params"], config, mode)}
  if isinstance(config, TinyVLMConfig):
    for tower in ("vision", "llm") + (("cnn",) if config.use_cnn else ()):
      if tower not in params:
        raise ValueError(f"quantize_params: the TinyVLM params have no {tower!r} tower (keys {sorted(params)})")
    out = dict(params)
    heads = [h for h in ("pooler", "connector", "fuser") if h in params]
    out.update(_quantize_tree({h: params[h] for h in heads}, qmode, (), embeddings=False, only_packable=True))
    out["vision"] = _quantize_tree(params["vision"], qmode, ("vision",), embeddings=False)
    out["llm"] = _quantize_tree(params["llm"], qmode, ("llm",), embeddings=True)
    if config.use_cnn:
      out["cnn"] = _quantize_tree(params["cnn"], qmode, ("cnn",), embeddings=False, only_packable=True)
    return out
  if isinstance(config, QwenConfig):
    return _quantize_tree(params, qmode, (), embeddings=True)
  if isinstance(config, SiglipConfig):
    return _quantize_tree(params, qmode, (), embeddings=False)
  if isinstance(config, ConvNextV2Config):
    return _quantize_tree(params, qmode, (), embeddings=False, only_packable=True)
  raise TypeError("quantize_params: config must be a TinyVLMConfig, QwenConfig, SiglipConfig or ConvNextV2Config, "
                  f"got {type(config)}")


def quantized_config(config, mode: str):
  """The config whose modules hold `quantize_params(..., mode)`'s params (LLM, vision tower, CNN, heads)."""
  from tinyvlm_jax.models.config import TinyVLMConfig
  parse_mode(mode)
  if isinstance(config, TinyVLMConfig):
    return dataclasses.replace(config, quantization=mode,
                               **{tower: dataclasses.replace(getattr(config, tower), quantization=mode)
                                  for tower in ("vision", "llm", "cnn")})
  return dataclasses.replace(config, quantization=mode)


def weight_bytes(params) -> int:
  """Bytes of all parameter arrays."""
  return int(sum(np.dtype(x.dtype).itemsize * int(np.prod(x.shape)) for x in jax.tree.leaves(params)))
