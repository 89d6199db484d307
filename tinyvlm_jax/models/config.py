"""Frozen architecture configs for each tower and for TinyVLM.

Field names follow transformers' config classes so a config converts one-to-one in
both directions. The numbers themselves live in `tinyvlm_jax.presets`; these classes
only say what a field means.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping


def _from_mapping(cls, values: Mapping[str, Any]):
  """Builds a frozen config from a dict, naming any field it does not know."""
  values = dict(values)
  known = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - known)
  if unknown:
    raise ValueError(f"{cls.__name__}: unknown field(s) {unknown}; known fields are {sorted(known)}")
  for f in dataclasses.fields(cls):
    if f.name in values and isinstance(values[f.name], list):
      values[f.name] = tuple(values[f.name])
  return cls(**values)


@dataclasses.dataclass(frozen=True)
class SiglipConfig:
  """SigLIP vision tower (transformers `SiglipVisionConfig`)."""
  image_size: int = 384
  patch_size: int = 16
  num_channels: int = 3
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  layer_norm_eps: float = 1e-6
  hidden_act: str = "gelu_pytorch_tanh"
  dtype: str = "float32"  # compute dtype; parameters stay float32
  quantization: str = "none"  # none | int8 | int4 | int4_g{32,64,128}: weight-only (tinyvlm_jax.quantize)
  matmul_dtype: str = "float32"  # float32 | bfloat16: the operands of many-row matmuls (cpu_kernels.matmul_dot_general)

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size

  @property
  def num_patches(self) -> int:
    return self.grid ** 2

  from_dict = classmethod(_from_mapping)


@dataclasses.dataclass(frozen=True)
class QwenConfig:
  """Qwen2 decoder (transformers `Qwen2Config`)."""
  vocab_size: int = 151936
  hidden_size: int = 896
  intermediate_size: int = 4864
  num_hidden_layers: int = 24
  num_attention_heads: int = 14
  num_key_value_heads: int = 2
  rms_norm_eps: float = 1e-6
  rope_theta: float = 1_000_000.0
  tie_word_embeddings: bool = True
  max_position_embeddings: int = 32768
  hidden_act: str = "silu"
  initializer_range: float = 0.02  # std of the normal init of every weight matrix and the embedding
  dtype: str = "float32"
  remat: str = "none"  # none | full | dots: rematerialisation of each decoder layer
  quantization: str = "none"  # none | int8 | int4 | int4_g{32,64,128}: weight-only (tinyvlm_jax.quantize)
  matmul_dtype: str = "float32"  # float32 | bfloat16: the operands of a prefill's matmuls (cpu_kernels.matmul_dot_general)

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  from_dict = classmethod(_from_mapping)


@dataclasses.dataclass(frozen=True)
class ConvNextV2Config:
  """ConvNeXt-V2 (transformers `ConvNextV2Config`)."""
  image_size: int = 224
  num_channels: int = 3
  patch_size: int = 4
  depths: tuple[int, ...] = (3, 3, 9, 3)
  hidden_sizes: tuple[int, ...] = (96, 192, 384, 768)
  layer_norm_eps: float = 1e-6
  hidden_act: str = "gelu"
  dtype: str = "float32"
  # none | int8 | int4 | int4_g{32,64,128}: the blocks' pointwise Dense layers and the patchify convs
  # (stem, downsampling), weight-only, where their widths fit the packing
  # (tinyvlm_jax.quantize.packable); the depthwise convs stay float32
  quantization: str = "none"

  @property
  def grid(self) -> int:
    """Side of the output token grid: stem /patch_size, then /2 per later stage."""
    return self.image_size // (self.patch_size * 2 ** (len(self.depths) - 1))

  @property
  def num_tokens(self) -> int:
    return self.grid ** 2

  from_dict = classmethod(_from_mapping)


@dataclasses.dataclass(frozen=True)
class TinyVLMConfig:
  """The whole model: towers plus the three small heads (pooler, connector, fuser)."""
  vision: SiglipConfig = SiglipConfig()
  llm: QwenConfig = QwenConfig()
  cnn: ConvNextV2Config = ConvNextV2Config()
  zoom: bool = True            # global view plus 4 tiles of the 2x zoom (5 views) or the global view only
  pooler: str = "conv"         # conv | mean | none
  pool_stride: int = 2
  use_cnn: bool = True         # ConvNeXt branch and CrossAttentionFuser (stage 3)
  feature_layer: int = -1      # -1: last layer after post_layernorm; k >= 0: hidden_states[k] (0 = embeddings)
  fuser_heads: int = 1
  image_token_id: int = 151655  # <|image_pad|>: the placeholder replaced by the visual tokens
  dtype: str = "float32"
  # none | int8 | int4 | int4_g{32,64,128}: the heads' Dense layers and the pooler's conv,
  # weight-only, where they fit the packing (tinyvlm_jax.quantize; the towers have their own field)
  quantization: str = "none"

  @classmethod
  def from_dict(cls, values: Mapping[str, Any]) -> "TinyVLMConfig":
    values = dict(values)
    sub = {"vision": SiglipConfig, "llm": QwenConfig, "cnn": ConvNextV2Config}
    for key, sub_cls in sub.items():
      if key in values and not isinstance(values[key], sub_cls):
        values[key] = sub_cls.from_dict(values[key])
    return _from_mapping(cls, values)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @property
  def num_views(self) -> int:
    return 5 if self.zoom else 1

  @property
  def tokens_per_view(self) -> int:
    if self.pooler == "none":
      return self.vision.num_patches
    return (self.vision.grid // self.pool_stride) ** 2

  @property
  def num_vit_tokens(self) -> int:
    return self.num_views * self.tokens_per_view

  @property
  def num_cnn_tokens(self) -> int:
    return self.cnn.num_tokens if self.use_cnn else 0

  @property
  def num_visual_tokens(self) -> int:
    return self.num_cnn_tokens + self.num_vit_tokens

  def kv_cache_bytes_per_token(self, bytes_per_element: int = 2) -> int:
    """K and V for every layer and KV head, bf16 by default: 12,288 B for Qwen2.5-0.5B."""
    llm = self.llm
    return llm.num_hidden_layers * 2 * llm.num_key_value_heads * llm.head_dim * bytes_per_element

  def visual_kv_cache_bytes(self, bytes_per_element: int = 2) -> int:
    """KV-cache bytes per sample taken by the visual tokens (paper Tables 2 and 4)."""
    return self.num_visual_tokens * self.kv_cache_bytes_per_token(bytes_per_element)
