"""TinyVLM: SigLIP (5 views) -> ConvPooler -> Connector, ConvNeXt-V2 -> CrossAttentionFuser, into Qwen2.

Visual tokens (order: CNN, global, TL, TR, BL, BR) replace, one for one, the image-placeholder
ids of the prompt: the tokenizer expands `<image>` to `config.num_visual_tokens` copies of
`config.image_token_id`, so every shape is static.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from tinyvlm_jax.models.config import TinyVLMConfig
from tinyvlm_jax.models.convnext import ConvNextV2
from tinyvlm_jax.models.heads import Connector, ConvPooler, CrossAttentionFuser
from tinyvlm_jax.models.qwen2 import Qwen2ForCausalLM
from tinyvlm_jax.models.siglip import SiglipVisionTower


def splice_visual_tokens(input_ids, text_embeds, visual_tokens, image_token_id: int):
  """Puts visual token k of each row at that row's k-th placeholder id.

  input_ids [B, L], text_embeds [B, L, D], visual_tokens [B, N, D] -> [B, L, D].
  Rows without placeholders (text-only samples) keep their text embeddings.
  """
  is_image = input_ids == image_token_id
  index = jnp.clip(jnp.cumsum(is_image, axis=1) - 1, 0, visual_tokens.shape[1] - 1)  # [B, L]
  gathered = jnp.take_along_axis(visual_tokens, index[..., None], axis=1)  # [B, L, D]
  return jnp.where(is_image[..., None], gathered.astype(text_embeds.dtype), text_embeds)


class TinyVLM(nn.Module):
  config: TinyVLMConfig

  def setup(self):
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    self.vision = SiglipVisionTower(cfg.vision)
    self.pooler = ConvPooler(kind=cfg.pooler, stride=cfg.pool_stride, dtype=dtype, quantization=cfg.quantization)
    self.connector = Connector(width=cfg.llm.hidden_size, dtype=dtype, quantization=cfg.quantization)
    self.llm = Qwen2ForCausalLM(cfg.llm)
    if cfg.use_cnn:
      self.cnn = ConvNextV2(cfg.cnn)
      self.fuser = CrossAttentionFuser(width=cfg.llm.hidden_size, num_heads=cfg.fuser_heads, dtype=dtype,
                                       quantization=cfg.quantization)

  def vit_features(self, pixel_values):
    """[N, S, S, 3] -> [N, P, D_vis] at the configured feature layer."""
    last, hidden_states = self.vision(pixel_values)
    return last if self.config.feature_layer == -1 else hidden_states[self.config.feature_layer]

  def encode_images(self, pixel_values, cnn_pixel_values=None):
    """[B, V, S, S, 3] (+ CNN view [B, C, C, 3]) -> visual tokens [B, num_visual_tokens, D_llm]."""
    cfg = self.config
    b, v = pixel_values.shape[:2]
    if v != cfg.num_views:
      raise ValueError(f"pixel_values has {v} views per image, the config expects {cfg.num_views} "
                       f"(zoom={cfg.zoom})")
    feats = self.vit_features(pixel_values.reshape((b * v,) + pixel_values.shape[2:]))  # [B*V, P, Dv]
    pooled = self.pooler(feats)  # [B*V, P, Dv] -> [B*V, P', Dv]
    vit_tokens = self.connector(pooled.reshape(b, -1, pooled.shape[-1]))  # [B, V*P', D_llm]
    if not cfg.use_cnn:
      return vit_tokens
    if cnn_pixel_values is None:
      raise ValueError("the config uses the CNN branch (use_cnn=True) but no cnn_pixel_values were given")
    cnn = self.cnn(cnn_pixel_values)  # [B, h, w, Dc]
    cnn = cnn.reshape(b, -1, cnn.shape[-1])  # [B, 49, Dc]
    global_tokens = feats.reshape((b, v) + feats.shape[1:])[:, 0]  # unpooled global view [B, P, Dv]
    fused = self.fuser(cnn, global_tokens)  # [B, 49, D_llm]
    return jnp.concatenate([fused.astype(vit_tokens.dtype), vit_tokens], axis=1)  # [B, 769, D_llm]

  def embed_inputs(self, input_ids, visual_tokens=None, text_noise=None):
    """Token ids [B, L] -> LLM input embeddings [B, L, D], visual tokens at the placeholders.

    `text_noise` [B, L, D] (NEFTune) is added to the text embeddings only.
    """
    embeds = self.llm.embed(input_ids)
    if text_noise is not None:
      embeds = embeds + text_noise.astype(embeds.dtype)
    if visual_tokens is None:
      return embeds
    return splice_visual_tokens(input_ids, embeds, visual_tokens, self.config.image_token_id)

  def decode(self, inputs_embeds, *, positions, attention_mask, cache=None, cache_index=None,
             hidden_only: bool = False):
    """The LLM on given input embeddings -> (logits [B, L, V] or hidden states [B, L, D], cache)."""
    return self.llm(inputs_embeds=inputs_embeds, positions=positions, attention_mask=attention_mask,
                    cache=cache, cache_index=cache_index, hidden_only=hidden_only)

  def lm_logits(self, hidden):
    """Final hidden states [..., D] -> logits [..., V]: for the supervised positions only, in training."""
    return self.llm.lm_logits(hidden)

  def __call__(self, input_ids, pixel_values=None, cnn_pixel_values=None, *, positions, attention_mask,
               cache=None, cache_index=None, text_noise=None, hidden_only: bool = False):
    """Token ids with placeholders + images -> (logits [B, L, V] or hidden states, cache)."""
    visual = None if pixel_values is None else self.encode_images(pixel_values, cnn_pixel_values)
    embeds = self.embed_inputs(input_ids, visual, text_noise)
    return self.decode(embeds, positions=positions, attention_mask=attention_mask, cache=cache,
                       cache_index=cache_index, hidden_only=hidden_only)


def dummy_inputs(config: TinyVLMConfig, batch: int = 1, seq_len: int | None = None):
  """Zero inputs of the right shapes, for `init` and `jax.eval_shape`."""
  seq_len = seq_len or config.num_visual_tokens + 8
  s, c = config.vision.image_size, config.cnn.image_size
  return dict(
      input_ids=jnp.zeros((batch, seq_len), jnp.int32),
      pixel_values=jnp.zeros((batch, config.num_views, s, s, 3), jnp.float32),
      cnn_pixel_values=jnp.zeros((batch, c, c, 3), jnp.float32) if config.use_cnn else None,
      positions=jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32), (batch, seq_len)),
      attention_mask=jnp.ones((batch, seq_len), jnp.int32),
  )


# XLA:CPU compiler options for programs that run once or a few times (init here, test subprocesses).
# Measured on the tiny preset's gradient program: 35 s to compile with XLA's defaults, 22 s without
# the backend optimisations, 13 s without the fusion emitters as well.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True,
                "xla_cpu_use_fusion_emitters": False}


def init_params(config: TinyVLMConfig, rng: jax.Array):
  """Random parameters for the whole model (heads as DESIGN 1 says: pooler = 2x2 average at init)."""
  inputs = dummy_inputs(config, seq_len=8)
  # Jitted, with an "rbg" key derived from `rng`: eager init dispatches thousands of small ops, and
  # XLA:CPU compiles threefry truncated-normal draws for ~100 tensors 5x slower than rbg ones.
  key = jax.random.wrap_key_data(jax.random.bits(rng, (4,), jnp.uint32), impl="rbg")
  init = jax.jit(lambda k, x: TinyVLM(config).init(k, **x)["params"])
  if isinstance(key, jax.core.Tracer):  # inside a trace (param_shapes' eval_shape): nothing is compiled
    return init(key, inputs)
  # Runs once: compiled without XLA's backend optimisations, which halves its compile time
  # (15.6 s -> 8.4 s for the "tiny" preset on a loaded 2-core CPU); values agree to 1 ulp.
  return init.lower(key, inputs).compile(FAST_COMPILE)(key, inputs)


def param_shapes(config: TinyVLMConfig):
  """Parameter ShapeDtypeStructs without allocating anything."""
  return jax.eval_shape(lambda k: init_params(config, k), jax.random.key(0))


def count_params(tree) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(tree))
