"""Qwen2 weights and config: transformers `Qwen2ForCausalLM` <-> `models.qwen2.Qwen2ForCausalLM`.

Tied embeddings (Qwen2.5-0.5B): the checkpoint has no `lm_head.weight` and
transformers' `save_pretrained` drops it, so export leaves it out too. On import an
`lm_head.weight` that a tied model's `state_dict()` lists is accepted only if it equals
the embedding.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from tinyvlm_jax.convert.mapping import (CheckpointMismatchError, Rule, flax_from_hf, hf_from_flax,
                                         state_dict_of)
from tinyvlm_jax.models.config import QwenConfig
from tinyvlm_jax.models.qwen2 import Qwen2ForCausalLM

LM_HEAD = "lm_head.weight"
EMBED = "model.embed_tokens.weight"


def param_table(cfg: QwenConfig) -> list[Rule]:
  """One Rule per parameter: Flax path (under "params"), transformers key, transform."""
  table = [Rule(("embed_tokens", "embedding"), EMBED)]
  for i in range(cfg.num_hidden_layers):
    ours, theirs = f"layers_{i}", f"model.layers.{i}"
    for name in ("q_proj", "k_proj", "v_proj"):
      table.append(Rule((ours, "self_attn", name, "kernel"), f"{theirs}.self_attn.{name}.weight", "linear"))
      table.append(Rule((ours, "self_attn", name, "bias"), f"{theirs}.self_attn.{name}.bias"))
    table.append(Rule((ours, "self_attn", "o_proj", "kernel"), f"{theirs}.self_attn.o_proj.weight", "linear"))
    for name in ("gate_proj", "up_proj", "down_proj"):
      table.append(Rule((ours, "mlp", name, "kernel"), f"{theirs}.mlp.{name}.weight", "linear"))
    for name in ("input_layernorm", "post_attention_layernorm"):
      table.append(Rule((ours, name, "scale"), f"{theirs}.{name}.weight"))
  table.append(Rule(("norm", "scale"), "model.norm.weight"))
  if not cfg.tie_word_embeddings:
    table.append(Rule(("lm_head", "kernel"), LM_HEAD, "linear"))
  return table


def param_shapes(cfg: QwenConfig) -> dict:
  """The Flax params tree as ShapeDtypeStructs (no weights allocated)."""
  model = Qwen2ForCausalLM(cfg)
  ids = jnp.zeros((1, 1), jnp.int32)
  init = lambda: model.init(jax.random.PRNGKey(0), ids, positions=ids, attention_mask=ids)
  return jax.eval_shape(init)["params"]


def params_from_hf(source, cfg: QwenConfig, prefix: str = "") -> dict:
  """transformers Qwen2ForCausalLM (module, state dict or checkpoint folder) -> Flax params tree.

  Returns the tree that `model.init(...)["params"]` holds (apply with {"params": tree}),
  float32 as the model expects. `prefix` is prepended to every transformers key.
  """
  name = os.fspath(source) if isinstance(source, (str, os.PathLike)) else "Qwen2 checkpoint"
  state = state_dict_of(source)
  ignore = ()
  if cfg.tie_word_embeddings and prefix + LM_HEAD in state:
    head, embed = state[prefix + LM_HEAD], state.get(prefix + EMBED)
    if embed is not None and not np.array_equal(np.asarray(head), np.asarray(embed)):
      raise CheckpointMismatchError(
          f"{name}: key {prefix + LM_HEAD!r} differs from {prefix + EMBED!r}, but the config ties the "
          "embeddings (tie_word_embeddings=True); use tie_word_embeddings=False for this checkpoint")
    ignore = (LM_HEAD,)
  expected = param_shapes(cfg)
  try:
    params = flax_from_hf(state, param_table(cfg), prefix=prefix, expected=expected, ignore=ignore, source=name)
  except CheckpointMismatchError as e:
    found = sorted(k[:-len(EMBED)] for k in state if k.endswith(EMBED))
    if found and prefix not in found:
      raise CheckpointMismatchError(f"{e}; this checkpoint keeps the Qwen2 model under prefix {found[0]!r}: "
                                    f"pass prefix={found[0]!r}") from None
    raise
  return jax.tree.map(lambda x, want: np.asarray(x, dtype=want.dtype), params, expected)


def hf_state_from_params(params: Mapping[str, Any], cfg: QwenConfig, prefix: str = "") -> dict[str, np.ndarray]:
  """Flax params tree (with or without the top-level "params") -> transformers state dict.

  Keys are those `save_pretrained` writes: no `lm_head.weight` for tied embeddings.
  """
  if set(params) == {"params"}:
    params = params["params"]
  return hf_from_flax(params, param_table(cfg), prefix=prefix)


def to_hf_config(cfg: QwenConfig):
  """QwenConfig -> transformers.Qwen2Config."""
  import transformers
  return transformers.Qwen2Config(
      vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
      num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
      num_key_value_heads=cfg.num_key_value_heads, hidden_act=cfg.hidden_act,
      max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.rms_norm_eps,
      tie_word_embeddings=cfg.tie_word_embeddings, initializer_range=cfg.initializer_range,
      rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta}, use_sliding_window=False)


def config_from_hf(hf_config) -> QwenConfig:
  """transformers.Qwen2Config (or a checkpoint folder holding config.json) -> QwenConfig."""
  if isinstance(hf_config, (str, os.PathLike)):
    import transformers
    hf_config = transformers.Qwen2Config.from_pretrained(os.fspath(hf_config))
  rope = dict(getattr(hf_config, "rope_parameters", None) or {})
  rope_type = rope.get("rope_type", "default")
  theta = rope.get("rope_theta", getattr(hf_config, "rope_theta", None))
  if rope_type != "default" or theta is None:
    raise ValueError(f"Qwen2 config: rope_parameters={rope} not supported; expected rope_type 'default' "
                     "with a rope_theta")
  if getattr(hf_config, "use_sliding_window", False):
    raise ValueError("Qwen2 config: use_sliding_window=True is not supported (Qwen2.5 uses full attention)")
  head_dim = getattr(hf_config, "head_dim", None)
  if head_dim is not None and head_dim != hf_config.hidden_size // hf_config.num_attention_heads:
    raise ValueError(f"Qwen2 config: head_dim={head_dim}, expected hidden_size / num_attention_heads = "
                     f"{hf_config.hidden_size // hf_config.num_attention_heads}")
  return QwenConfig(
      vocab_size=hf_config.vocab_size, hidden_size=hf_config.hidden_size,
      intermediate_size=hf_config.intermediate_size, num_hidden_layers=hf_config.num_hidden_layers,
      num_attention_heads=hf_config.num_attention_heads,
      num_key_value_heads=hf_config.num_key_value_heads or hf_config.num_attention_heads,
      rms_norm_eps=hf_config.rms_norm_eps, rope_theta=float(theta),
      tie_word_embeddings=bool(hf_config.tie_word_embeddings),
      max_position_embeddings=hf_config.max_position_embeddings, hidden_act=hf_config.hidden_act,
      initializer_range=float(hf_config.initializer_range))
