"""ConvNeXt-V2: our Flax params <-> transformers `ConvNextV2Model` state dict.

One explicit table (`param_table`) used in both directions. Every tensor of
`ConvNextV2Model(config).state_dict()` has exactly one Flax parameter, the final pooler
`layernorm` included (our model holds it; see `ConvNextV2.pooled`), so a round trip is
bit-exact. Params here are the tree under "params": apply with `{"params": params}`.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from tinyvlm_jax.convert.mapping import (TRANSFORMS, Rule, flax_from_hf, hf_from_flax,
                                         state_dict_of)
from tinyvlm_jax.models.config import ConvNextV2Config
from tinyvlm_jax.models.convnext import ConvNextV2

# GRN gamma/beta: torch [1, 1, 1, C] <-> Flax [C].
TRANSFORMS.setdefault("grn", (lambda x: np.ascontiguousarray(x.reshape(x.shape[-1])),
                              lambda x: np.ascontiguousarray(x.reshape(1, 1, 1, x.shape[-1]))))

# transformers keys that our model does not hold. None: the mapping is one-to-one.
IGNORED_KEYS: tuple[str, ...] = ()


def _layernorm(flax: tuple[str, ...], hf: str) -> list[Rule]:
  return [Rule(flax + ("scale",), hf + ".weight"), Rule(flax + ("bias",), hf + ".bias")]


def _conv(flax: tuple[str, ...], hf: str) -> list[Rule]:
  return [Rule(flax + ("kernel",), hf + ".weight", "conv2d"), Rule(flax + ("bias",), hf + ".bias")]


def _linear(flax: tuple[str, ...], hf: str) -> list[Rule]:
  return [Rule(flax + ("kernel",), hf + ".weight", "linear"), Rule(flax + ("bias",), hf + ".bias")]


def param_table(cfg: ConvNextV2Config) -> list[Rule]:
  """Flax path <-> `ConvNextV2Model` state-dict key, for every parameter."""
  rules = _conv(("embeddings", "patch_embeddings"), "embeddings.patch_embeddings")
  rules += _layernorm(("embeddings", "layernorm"), "embeddings.layernorm")
  for i, depth in enumerate(cfg.depths):
    stage, hf_stage = (f"stages_{i}",), f"encoder.stages.{i}"
    if i > 0:
      rules += _layernorm(stage + ("downsampling_layernorm",), f"{hf_stage}.downsampling_layer.0")
      rules += _conv(stage + ("downsampling_conv",), f"{hf_stage}.downsampling_layer.1")
    for j in range(depth):
      layer, hf_layer = stage + (f"layers_{j}",), f"{hf_stage}.layers.{j}"
      rules += _conv(layer + ("dwconv",), f"{hf_layer}.dwconv")  # torch [C, 1, 7, 7] -> Flax [7, 7, 1, C]
      rules += _layernorm(layer + ("layernorm",), f"{hf_layer}.layernorm")
      rules += _linear(layer + ("pwconv1",), f"{hf_layer}.pwconv1")
      rules += [Rule(layer + ("grn", "weight"), f"{hf_layer}.grn.weight", "grn"),
                Rule(layer + ("grn", "bias"), f"{hf_layer}.grn.bias", "grn")]
      rules += _linear(layer + ("pwconv2",), f"{hf_layer}.pwconv2")
  rules += _layernorm(("layernorm",), "layernorm")
  return rules


def param_shapes(cfg: ConvNextV2Config) -> dict:
  """The params tree as ShapeDtypeStructs, without allocating weights."""
  x = jax.ShapeDtypeStruct((1, cfg.image_size, cfg.image_size, cfg.num_channels), jnp.float32)
  return jax.eval_shape(ConvNextV2(cfg).init, jax.random.PRNGKey(0), x)["params"]


def params_from_hf(source, cfg: ConvNextV2Config, prefix: str = "") -> dict:
  """transformers ConvNextV2 (torch module, state dict or checkpoint folder/file) -> Flax params.

  `prefix` is the key prefix of the backbone inside `source` (e.g. "convnextv2." for
  `ConvNextV2ForImageClassification`). Raises `CheckpointMismatchError` naming the key on
  a missing, unexpected or wrongly shaped tensor.
  """
  state = state_dict_of(source)
  name = os.fspath(source) if isinstance(source, (str, os.PathLike)) else type(source).__name__
  params = flax_from_hf(state, param_table(cfg), prefix=prefix, expected=param_shapes(cfg),
                        ignore=IGNORED_KEYS, source=f"ConvNextV2 checkpoint {name}")
  return jax.tree.map(lambda x: np.asarray(x, np.float32), params)


def hf_state_from_params(params: Mapping[str, Any], cfg: ConvNextV2Config, prefix: str = "") -> dict[str, np.ndarray]:
  """Flax params (the tree under "params", or the whole variables dict) -> `ConvNextV2Model` state dict."""
  if set(params) == {"params"}:
    params = params["params"]
  params = jax.tree.map(np.asarray, params)
  return hf_from_flax(params, param_table(cfg), prefix=prefix)


def to_hf_config(cfg: ConvNextV2Config):
  """Our config -> `transformers.ConvNextV2Config` (no drop path: inference numerics)."""
  import transformers
  return transformers.ConvNextV2Config(
      num_channels=cfg.num_channels, patch_size=cfg.patch_size, num_stages=len(cfg.depths),
      hidden_sizes=list(cfg.hidden_sizes), depths=list(cfg.depths), hidden_act=cfg.hidden_act,
      layer_norm_eps=cfg.layer_norm_eps, image_size=cfg.image_size, drop_path_rate=0.0)


def config_from_hf(hf_config, dtype: str = "float32") -> ConvNextV2Config:
  """`transformers.ConvNextV2Config` (or its dict) -> our config."""
  defaults = ConvNextV2Config()

  def get(key):
    value = hf_config.get(key) if isinstance(hf_config, Mapping) else getattr(hf_config, key, None)
    return getattr(defaults, key) if value is None else value

  depths, hidden_sizes = tuple(get("depths")), tuple(get("hidden_sizes"))
  if len(depths) != len(hidden_sizes):
    raise ValueError(f"ConvNextV2 config: depths {depths} and hidden_sizes {hidden_sizes} differ in length")
  return ConvNextV2Config(image_size=get("image_size"), num_channels=get("num_channels"),
                          patch_size=get("patch_size"), depths=depths, hidden_sizes=hidden_sizes,
                          layer_norm_eps=get("layer_norm_eps"), hidden_act=get("hidden_act"), dtype=dtype)
