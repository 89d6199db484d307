"""Model presets: the one place where the paper's numbers live.

`get_preset(name)` returns an `ml_collections.ConfigDict` that configs/ files embed and
the command line overrides; `model_config(cfg)` turns it into the frozen
`TinyVLMConfig` the modules take. Tests and benchmarks read these, never literals.
"""

from __future__ import annotations

import ml_collections

from tinyvlm_jax.models.config import TinyVLMConfig

# Preprocessing constants (DESIGN 1.1): SigLIP maps [0, 255] to [-1, 1]; the CNN uses ImageNet statistics.
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _tinyvlm_0p6b() -> dict:
  """DESIGN 1: SigLIP-B/16-384, 2x2 ConvPooler, Qwen2.5-0.5B-Instruct, ConvNeXt-V2-Tiny."""
  return dict(
      vision=dict(image_size=384, patch_size=16, num_channels=3, hidden_size=768, intermediate_size=3072,
                  num_hidden_layers=12, num_attention_heads=12, layer_norm_eps=1e-6,
                  hidden_act="gelu_pytorch_tanh"),
      llm=dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
               num_attention_heads=14, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1_000_000.0,
               tie_word_embeddings=True, max_position_embeddings=32768, hidden_act="silu"),
      cnn=dict(image_size=224, num_channels=3, patch_size=4, depths=(3, 3, 9, 3),
               hidden_sizes=(96, 192, 384, 768), layer_norm_eps=1e-6, hidden_act="gelu"),
      zoom=True, pooler="conv", pool_stride=2, use_cnn=True, feature_layer=-1, fuser_heads=1,
      image_token_id=151655,
  )


def _tiny() -> dict:
  """Small random model for tests: every code path of the full preset, at toy widths."""
  return dict(
      vision=dict(image_size=32, patch_size=8, num_channels=3, hidden_size=32, intermediate_size=64,
                  num_hidden_layers=2, num_attention_heads=4, layer_norm_eps=1e-6,
                  hidden_act="gelu_pytorch_tanh"),
      llm=dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=10_000.0,
               tie_word_embeddings=True, max_position_embeddings=512, hidden_act="silu"),
      cnn=dict(image_size=32, num_channels=3, patch_size=4, depths=(1, 1, 1, 1),
               hidden_sizes=(8, 16, 24, 32), layer_norm_eps=1e-6, hidden_act="gelu"),
      zoom=True, pooler="conv", pool_stride=2, use_cnn=True, feature_layer=-1, fuser_heads=1,
      image_token_id=500,
  )


def _demo() -> dict:
  """The CPU demo: the TinyVLM architecture at small widths with Qwen2.5's real vocabulary."""
  return dict(
      vision=dict(image_size=64, patch_size=8, num_channels=3, hidden_size=96, intermediate_size=192,
                  num_hidden_layers=2, num_attention_heads=4, layer_norm_eps=1e-6,
                  hidden_act="gelu_pytorch_tanh"),
      llm=dict(vocab_size=151936, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=10_000.0,
               tie_word_embeddings=True, max_position_embeddings=1024, hidden_act="silu"),
      cnn=dict(image_size=64, num_channels=3, patch_size=4, depths=(1, 1, 1, 1),
               hidden_sizes=(16, 32, 48, 64), layer_norm_eps=1e-6, hidden_act="gelu"),
      zoom=True, pooler="conv", pool_stride=2, use_cnn=True, feature_layer=-1, fuser_heads=1,
      image_token_id=151655,
  )


PRESETS = {"tinyvlm_0p6b": _tinyvlm_0p6b, "tiny": _tiny, "demo": _demo}


def get_preset(name: str = "tinyvlm_0p6b") -> ml_collections.ConfigDict:
  """Returns a fresh, mutable ConfigDict for the named preset."""
  if name not in PRESETS:
    raise ValueError(f"unknown model preset {name!r}; known presets: {sorted(PRESETS)}")
  return ml_collections.ConfigDict(PRESETS[name]())


def model_config(cfg: "ml_collections.ConfigDict | dict | str") -> TinyVLMConfig:
  """ConfigDict (or a preset name) -> frozen TinyVLMConfig, rejecting unknown fields by name."""
  if isinstance(cfg, str):
    cfg = get_preset(cfg)
  if isinstance(cfg, ml_collections.ConfigDict):
    cfg = cfg.to_dict()
  return TinyVLMConfig.from_dict(cfg)
