"""SigLIP vision tower <-> transformers `SiglipVisionModel`: one table, both directions.

Keys are those of `SiglipVisionModel(config).state_dict()` in transformers 5.x, which has
no "vision_model." level ("embeddings.patch_embedding.weight", ...). Checkpoints of the
whole `SiglipModel` (and `SiglipVisionModel`s saved by transformers 4.x) nest the same keys
under "vision_model.": pass `prefix="vision_model."` for those.

Flax side: the inner params tree of `SiglipVisionTower` (apply it as
`model.apply({"params": params}, pixels)`).
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from tinyvlm_jax.convert.mapping import (CheckpointMismatchError, Rule, flax_from_hf, hf_from_flax,
                                         state_dict_of)
from tinyvlm_jax.models.config import SiglipConfig
from tinyvlm_jax.models.siglip import SiglipVisionTower

# Keys a SigLIP checkpoint may hold that the tower does not use: the position-id buffer
# (persisted by old transformers versions) and the MAP pooling head (`vision_use_head=True`,
# e.g. every google/siglip-* checkpoint), which TinyVLM does not have.
IGNORED_KEYS = (
    "embeddings.position_ids",
    "head.probe",
    "head.attention.in_proj_weight",
    "head.attention.in_proj_bias",
    "head.attention.out_proj.weight",
    "head.attention.out_proj.bias",
    "head.layernorm.weight",
    "head.layernorm.bias",
    "head.mlp.fc1.weight",
    "head.mlp.fc1.bias",
    "head.mlp.fc2.weight",
    "head.mlp.fc2.bias",
)

_ANCHOR = "embeddings.patch_embedding.weight"  # used to find where a checkpoint keeps the tower


def _layer_norm(flax: tuple[str, ...], hf: str) -> list[Rule]:
  return [Rule(flax + ("scale",), f"{hf}.weight"), Rule(flax + ("bias",), f"{hf}.bias")]


def _linear(flax: tuple[str, ...], hf: str) -> list[Rule]:
  return [Rule(flax + ("kernel",), f"{hf}.weight", "linear"), Rule(flax + ("bias",), f"{hf}.bias")]


def param_table(cfg: SiglipConfig) -> list[Rule]:
  """Every parameter of `SiglipVisionTower(cfg)` and its `SiglipVisionModel` key."""
  rules = [
      Rule(("embeddings", "patch_embedding", "kernel"), "embeddings.patch_embedding.weight", "conv2d"),
      Rule(("embeddings", "patch_embedding", "bias"), "embeddings.patch_embedding.bias"),
      Rule(("embeddings", "position_embedding", "embedding"), "embeddings.position_embedding.weight"),
  ]
  for i in range(cfg.num_hidden_layers):
    flax, hf = ("encoder", f"layers_{i}"), f"encoder.layers.{i}"
    rules += _layer_norm(flax + ("layer_norm1",), f"{hf}.layer_norm1")
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
      rules += _linear(flax + ("self_attn", proj), f"{hf}.self_attn.{proj}")
    rules += _layer_norm(flax + ("layer_norm2",), f"{hf}.layer_norm2")
    rules += _linear(flax + ("mlp", "fc1"), f"{hf}.mlp.fc1")
    rules += _linear(flax + ("mlp", "fc2"), f"{hf}.mlp.fc2")
  rules += _layer_norm(("post_layernorm",), "post_layernorm")
  return rules


def param_shapes(cfg: SiglipConfig) -> dict:
  """The tower's params tree as ShapeDtypeStructs, without allocating weights."""
  model = SiglipVisionTower(cfg)
  pixels = jax.ShapeDtypeStruct((1, cfg.image_size, cfg.image_size, cfg.num_channels), jnp.float32)
  return jax.eval_shape(model.init, jax.random.key(0), pixels)["params"]


def params_from_hf(source, cfg: SiglipConfig, prefix: str = "") -> dict:
  """A torch `SiglipVisionModel`, its state dict or a checkpoint folder -> the tower's params tree."""
  state = state_dict_of(source)
  expected = param_shapes(cfg)
  where = os.fspath(source) if isinstance(source, (str, os.PathLike)) else type(source).__name__
  try:
    params = flax_from_hf(state, param_table(cfg), prefix=prefix, expected=expected, ignore=IGNORED_KEYS,
                          source=f"SigLIP checkpoint ({where})")
  except CheckpointMismatchError as e:
    found = sorted(k[:-len(_ANCHOR)] for k in state if k.endswith(_ANCHOR))
    if found and prefix not in found:
      raise CheckpointMismatchError(f"{e}; this checkpoint keeps the SigLIP tower under prefix {found[0]!r}: "
                                    f"pass prefix={found[0]!r}") from None
    raise
  return jax.tree.map(lambda x, want: np.asarray(x, want.dtype), params, expected)


def hf_state_from_params(params: Mapping[str, Any], cfg: SiglipConfig, prefix: str = "") -> dict[str, np.ndarray]:
  """The tower's params tree (or `{"params": tree}`) -> `SiglipVisionModel` state dict (numpy)."""
  if set(params) == {"params"}:
    params = params["params"]
  return hf_from_flax(params, param_table(cfg), prefix=prefix)


def to_hf_config(cfg: SiglipConfig):
  """SiglipConfig -> transformers `SiglipVisionConfig` (no MAP head, no dropout)."""
  from transformers import SiglipVisionConfig
  return SiglipVisionConfig(
      image_size=cfg.image_size, patch_size=cfg.patch_size, num_channels=cfg.num_channels,
      hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
      num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
      layer_norm_eps=cfg.layer_norm_eps, hidden_act=cfg.hidden_act, attention_dropout=0.0,
      vision_use_head=False)


def config_from_hf(hf_config, dtype: str = "float32") -> SiglipConfig:
  """transformers `SiglipVisionConfig` (or a `SiglipConfig`, whose vision part is taken) -> SiglipConfig.

  A MAP head (`vision_use_head=True`) is dropped: the tower returns patch tokens only.
  """
  hf_config = getattr(hf_config, "vision_config", hf_config)
  return SiglipConfig(
      image_size=hf_config.image_size, patch_size=hf_config.patch_size, num_channels=hf_config.num_channels,
      hidden_size=hf_config.hidden_size, intermediate_size=hf_config.intermediate_size,
      num_hidden_layers=hf_config.num_hidden_layers, num_attention_heads=hf_config.num_attention_heads,
      layer_norm_eps=hf_config.layer_norm_eps, hidden_act=hf_config.hidden_act, dtype=dtype)
