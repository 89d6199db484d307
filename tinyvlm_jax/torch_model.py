"""TinyVLM in PyTorch, for deployment: transformers' three models plus the three small heads.

Loads the export of convert/jax_to_torch.py (`TinyVLMTorch.from_pretrained(folder)`) and
generates with `Qwen2ForCausalLM.generate`. Needs torch and transformers only, not JAX.
Module names equal the export's keys (`vision_model.`, `language_model.`, `cnn.`, `pooler.`,
`connector.`, `fuser.`), so the export is exactly this module's state dict (less a tied LM head).

Inputs follow the data pipeline: pixel arrays are NHWC (`[B, V, S, S, 3]` SigLIP views,
`[B, C, C, 3]` CNN view) and are transposed to NCHW here. The prompt holds
`config.num_visual_tokens` copies of `config.image_token_id`; they are replaced, in order, by
the visual tokens CNN, global, TL, TR, BL, BR.
"""

from __future__ import annotations

import json
import math
import os
from typing import Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from tinyvlm_jax.models.config import TinyVLMConfig
from tinyvlm_jax.models.positional import sincos_2d


class ConvPooler(nn.Module):
  """Cuts each view's patch grid by `stride` per side: `conv` (Conv2d k=s, stride s), `mean` or `none`."""

  def __init__(self, width: int, kind: str = "conv", stride: int = 2):
    super().__init__()
    if kind not in ("conv", "mean", "none"):
      raise ValueError(f"unknown pooler kind {kind!r}; expected conv, mean or none")
    self.kind, self.stride = kind, stride
    if kind == "conv":
      self.conv = nn.Conv2d(width, width, stride, stride=stride)

  def forward(self, x):  # [N, g*g, D] -> [N, (g/s)^2, D]
    if self.kind == "none":
      return x
    n, p, d = x.shape
    g = math.isqrt(p)
    x = x.reshape(n, g, g, d).permute(0, 3, 1, 2)  # [N, D, g, g]
    x = self.conv(x) if self.kind == "conv" else F.avg_pool2d(x, self.stride, self.stride)
    return x.flatten(2).transpose(1, 2)  # [N, D, g/s, g/s] -> [N, (g/s)^2, D]


class Connector(nn.Module):
  """Linear, exact GELU, Linear: vision width -> LLM width."""

  def __init__(self, in_width: int, width: int):
    super().__init__()
    self.fc1 = nn.Linear(in_width, width)
    self.fc2 = nn.Linear(width, width)

  def forward(self, x):  # [..., D_vis] -> [..., D_llm]
    return self.fc2(F.gelu(self.fc1(x)))


class CrossAttentionFuser(nn.Module):
  """CNN tokens attend to the unpooled global ViT tokens (DESIGN 1.2):
  softmax((Q + PE_q)(KV + PE_kv)^T / sqrt(d_head)) KV, one projection shared by keys and values."""

  def __init__(self, cnn_width: int, vit_width: int, width: int, num_heads: int = 1):
    super().__init__()
    self.width, self.num_heads = width, num_heads
    self.q_proj = nn.Linear(cnn_width, width)
    self.kv_proj = nn.Linear(vit_width, width)

  def forward(self, cnn_tokens, vit_tokens):  # [B, Nc, Dc], [B, Nv, Dv] -> [B, Nc, width]
    b, nc, _ = cnn_tokens.shape
    nv = vit_tokens.shape[1]
    q, kv = self.q_proj(cnn_tokens), self.kv_proj(vit_tokens)
    frame = math.isqrt(nv)
    pe_q = torch.from_numpy(sincos_2d(math.isqrt(nc), self.width, frame=frame)).to(q)
    pe_kv = torch.from_numpy(sincos_2d(frame, self.width, frame=frame)).to(kv)
    h, dh = self.num_heads, self.width // self.num_heads
    split = lambda x: x.reshape(b, -1, h, dh).transpose(1, 2)  # [B, N, W] -> [B, H, N, dh]
    logits = (split(q + pe_q) @ split(kv + pe_kv).transpose(-1, -2)).float() / math.sqrt(dh)
    attn = logits.softmax(-1).to(kv.dtype)  # [B, H, Nc, Nv]
    return (attn @ split(kv)).transpose(1, 2).reshape(b, nc, self.width)


def _stop_ids_of(folder: str) -> list[int] | None:
  """eos ids of generation_config.json, else the ids of <|im_end|> and <|endoftext|> in tokenizer.json."""
  path = os.path.join(folder, "generation_config.json")
  if os.path.isfile(path):
    with open(path) as f:
      eos = json.load(f).get("eos_token_id")
    if eos is not None:
      return [eos] if isinstance(eos, int) else list(eos)
  path = os.path.join(folder, "tokenizer.json")
  if os.path.isfile(path):
    with open(path) as f:
      added = {t["content"]: t["id"] for t in json.load(f).get("added_tokens", [])}
    ids = [added[t] for t in ("<|im_end|>", "<|endoftext|>") if t in added]
    return ids or None
  return None


class TinyVLMTorch(nn.Module):
  """TinyVLM: SiglipVisionModel -> ConvPooler -> Connector, ConvNextV2Model -> fuser, into Qwen2ForCausalLM.

  `hf_config` is an export's config.json (see `tinyvlm_jax.convert.tinyvlm.hf_config_dict`).
  """

  def __init__(self, hf_config: dict):
    super().__init__()
    import transformers
    self.hf_config = hf_config
    cfg = self.config = TinyVLMConfig.from_dict(hf_config["tinyvlm_config"])
    self.stop_ids: list[int] | None = None
    self.vision_model = transformers.SiglipVisionModel(transformers.SiglipVisionConfig.from_dict(hf_config["vision_config"]))
    self.language_model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config.from_dict(hf_config["text_config"]))
    if cfg.use_cnn:
      self.cnn = transformers.ConvNextV2Model(transformers.ConvNextV2Config.from_dict(hf_config["cnn_config"]))
    self.pooler = ConvPooler(cfg.vision.hidden_size, cfg.pooler, cfg.pool_stride)
    self.connector = Connector(cfg.vision.hidden_size, cfg.llm.hidden_size)
    if cfg.use_cnn:
      self.fuser = CrossAttentionFuser(cfg.cnn.hidden_sizes[-1], cfg.vision.hidden_size, cfg.llm.hidden_size,
                                       cfg.fuser_heads)

  @classmethod
  def from_pretrained(cls, folder, dtype: torch.dtype = torch.float32) -> "TinyVLMTorch":
    """Loads an export folder (config.json + safetensors, sharded or not) strictly; compute in `dtype`."""
    from safetensors.torch import load_file
    folder = os.fspath(folder)
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{folder}: no config.json; not a TinyVLM export (make one with convert/jax_to_torch.py)")
    with open(path) as f:
      hf_config = json.load(f)
    if hf_config.get("model_type") != "tinyvlm":
      raise ValueError(f"{path}: model_type is {hf_config.get('model_type')!r}, expected 'tinyvlm'")
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
      with open(index) as f:
        files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.isfile(os.path.join(folder, "model.safetensors")):
      files = ["model.safetensors"]
    else:
      raise FileNotFoundError(f"{folder}: no model.safetensors or {os.path.basename(index)}")
    try:
      from transformers.initialization import no_init_weights
    except ImportError:  # older transformers: pay for a random init that the load overwrites
      import contextlib
      no_init_weights = contextlib.nullcontext
    with no_init_weights():
      model = cls(hf_config)
    state = {}
    for name in files:
      state.update(load_file(os.path.join(folder, name)))
    model.load_export_state(state, source=folder)
    model.stop_ids = _stop_ids_of(folder)
    return model.to(dtype).eval()

  def load_export_state(self, state: dict, source: str = "state dict") -> None:
    """Strict load; only a tied LM head may be absent (it is the embedding)."""
    lm = self.language_model
    lm.tie_weights()  # a no-op unless the text config ties the embeddings
    missing, unexpected = self.load_state_dict(state, strict=False)
    tied = ["language_model.lm_head.weight"] if lm.lm_head.weight is lm.model.embed_tokens.weight else []
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
      raise ValueError(f"{source}: missing key(s) {missing[:8]}, unexpected key(s) {unexpected[:8]}")

  @staticmethod
  def _tensor(x, dtype=None):
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    return t if dtype is None else t.to(dtype)

  def encode_images(self, pixel_values, cnn_pixel_values=None):
    """[B, V, S, S, 3] NHWC (+ CNN view [B, C, C, 3]) -> visual tokens [B, num_visual_tokens, D_llm]."""
    cfg = self.config
    dtype = self.connector.fc1.weight.dtype
    pixel_values = self._tensor(pixel_values, dtype)
    b, v = pixel_values.shape[:2]
    if v != cfg.num_views:
      raise ValueError(f"pixel_values has {v} views per image, the config expects {cfg.num_views}")
    nchw = pixel_values.reshape((b * v,) + tuple(pixel_values.shape[2:])).permute(0, 3, 1, 2)
    if cfg.feature_layer == -1:
      feats = self.vision_model(pixel_values=nchw).last_hidden_state  # [B*V, P, Dv]
    else:
      feats = self.vision_model(pixel_values=nchw, output_hidden_states=True).hidden_states[cfg.feature_layer]
    pooled = self.pooler(feats)  # [B*V, P, Dv] -> [B*V, P', Dv]
    vit_tokens = self.connector(pooled.reshape(b, -1, pooled.shape[-1]))  # [B, V*P', D_llm]
    if not cfg.use_cnn:
      return vit_tokens
    if cnn_pixel_values is None:
      raise ValueError("the config uses the CNN branch (use_cnn=True) but no cnn_pixel_values were given")
    cnn = self.cnn(pixel_values=self._tensor(cnn_pixel_values, dtype).permute(0, 3, 1, 2)).last_hidden_state
    cnn = cnn.flatten(2).transpose(1, 2)  # [B, Dc, h, w] -> [B, h*w, Dc]
    global_tokens = feats.reshape((b, v) + tuple(feats.shape[1:]))[:, 0]  # unpooled global view [B, P, Dv]
    return torch.cat([self.fuser(cnn, global_tokens), vit_tokens], dim=1)  # [B, Nc + V*P', D_llm]

  def embed_inputs(self, input_ids, pixel_values=None, cnn_pixel_values=None):
    """[B, L] ids -> [B, L, D] input embeddings, visual token k at the k-th placeholder of each row."""
    input_ids = self._tensor(input_ids).long()
    embeds = self.language_model.get_input_embeddings()(input_ids)
    if pixel_values is None:
      return embeds
    visual = self.encode_images(pixel_values, cnn_pixel_values).to(embeds.dtype)
    is_image = input_ids == self.config.image_token_id
    index = (is_image.long().cumsum(1) - 1).clamp(0, visual.shape[1] - 1)  # [B, L]
    gathered = visual.gather(1, index[..., None].expand(-1, -1, visual.shape[-1]))  # [B, L, D]
    return torch.where(is_image[..., None], gathered, embeds)

  def forward(self, input_ids, pixel_values=None, cnn_pixel_values=None, attention_mask=None, position_ids=None):
    """Token ids with placeholders + NHWC images -> logits [B, L, V]. Position ids default to
    cumsum(attention_mask) - 1 (left padding)."""
    embeds = self.embed_inputs(input_ids, pixel_values, cnn_pixel_values)
    if attention_mask is None:
      attention_mask = torch.ones(embeds.shape[:2], dtype=torch.long)
    attention_mask = self._tensor(attention_mask).long()
    if position_ids is None:
      position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
    out = self.language_model(inputs_embeds=embeds, attention_mask=attention_mask,
                              position_ids=self._tensor(position_ids).long())
    return out.logits

  @torch.no_grad()
  def generate(self, input_ids, pixel_values=None, cnn_pixel_values=None, *, attention_mask=None,
               max_new_tokens: int = 32, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
               stop_ids: Sequence[int] | None = None, seed: int | None = None, streamer=None) -> torch.Tensor:
    """New token ids [B, T] (T <= max_new_tokens): greedy for temperature 0, else sampling with
    optional top-k / top-p. Rows stop at `stop_ids` (default: the export's <|im_end|>/<|endoftext|>
    or generation_config eos ids); finished rows are padded with the first stop id. `streamer`
    (a transformers streamer) gets the prompt ids first (none here: the prompt goes in as
    embeddings), then each new token."""
    import transformers
    stop_ids = list(stop_ids) if stop_ids is not None else self.stop_ids
    embeds = self.embed_inputs(input_ids, pixel_values, cnn_pixel_values)
    if attention_mask is None:
      attention_mask = torch.ones(embeds.shape[:2], dtype=torch.long)
    sample = temperature > 0
    gen = transformers.GenerationConfig(
        max_new_tokens=max_new_tokens, min_new_tokens=0, do_sample=sample,
        temperature=temperature if sample else None, top_k=top_k if sample and top_k > 0 else None,
        top_p=top_p if sample and top_p < 1.0 else None, eos_token_id=stop_ids or None,
        pad_token_id=stop_ids[0] if stop_ids else 0, bos_token_id=None)
    if seed is not None:
      torch.manual_seed(seed)
    return self.language_model.generate(inputs_embeds=embeds, attention_mask=self._tensor(attention_mask).long(),
                                        generation_config=gen, streamer=streamer)
