"""Caption-tag pretraining of the vision tower: the CPU demo's stand-in for SigLIP's pretraining.

The paper's stage 1 starts from SigLIP-B/16-384, pretrained on image-text pairs, and only
aligns the connector to features that already tell shapes, colours and text apart. Offline
there are no pretrained weights, and the demo's random 2-layer tower learns shapes and words
far more slowly through the LLM than on its own. Measured on the demo data (64 px, 2 cores):
stage 2 alone, 600 steps of 16 from random weights, reached shape 0.41 and word 0.28 held-out;
this pretraining, 600 steps of 32 images (all five views), read shape 0.89 and word 0.77 off the
tower with its linear head.

So the demo first pretrains the tower the way CatLIP does (Mehta et al., 2024, "CatLIP: CLIP-level
visual recognition accuracy with 2.7x faster pre-training on web-scale image-text data"): a
multi-label sigmoid cross-entropy over the words of each image's caption (its tags), read by a
linear head from the mean and the max of every view's tokens (by default the global view only,
as SigLIP sees whole images). Only the tower is kept; the head is dropped, and the result is an
ordinary model folder (the other modules at their random init) that stage 1 starts from.

The images of the caption set are decoded once into memory (uint8 views): a demo-sized set.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from tinyvlm_jax import model_io
from tinyvlm_jax.data import images
from tinyvlm_jax.models.config import TinyVLMConfig
from tinyvlm_jax.models.siglip import SiglipVisionTower
from tinyvlm_jax.models.tinyvlm import init_params

RESULTS_FILE = "vision_pretrain.json"


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
  steps: int = 600
  batch_size: int = 32
  lr: float = 1e-3
  warmup_steps: int = 50
  clip_norm: float = 1.0
  seed: int = 0
  global_view_only: bool = True  # the whole image, as SigLIP is pretrained; False: all views (zoom tiles too)


def caption_tags(caption: str) -> set[str]:
  """The lower-cased words of a caption."""
  return set(re.findall(r"[a-z]+", caption.lower()))


def _caption_of(row: dict, where: str) -> str:
  """A LLaVA-JSON row's caption: its `caption` field, else the first assistant turn."""
  if isinstance(row.get("caption"), str):
    return row["caption"]
  for turn in row.get("conversations", []):
    if turn.get("from") == "gpt" and isinstance(turn.get("value"), str):
      return turn["value"]
  raise ValueError(f"{where}: record {row.get('id', '?')!r} has neither a 'caption' nor an assistant turn")


def load_captioned_images(json_path: str, config: TinyVLMConfig, *, global_view_only: bool = False,
                          log: Callable[[str], None] = print):
  """LLaVA JSON of captioned images -> (uint8 views [N, V, S, S, 3], captions); bad records are skipped and counted.

  V is the config's number of views, or 1 with `global_view_only`.
  """
  with open(json_path) as f:
    rows = json.load(f)
  root = os.path.dirname(os.path.abspath(json_path))
  views, captions, bad = [], [], 0
  for i, row in enumerate(rows):
    try:
      caption = _caption_of(row, json_path)
      image = images.load_image(os.path.join(root, row["image"]), max_pixels=images.DEFAULT_MAX_PIXELS,
                                name=str(row.get("id", i)))
    except (KeyError, ValueError, OSError) as e:
      bad += 1
      if bad <= 3:
        log(f"vision pretraining: skipped record {i} ({row.get('id', '?')!r}, image {row.get('image')!r}) of "
            f"{json_path}: {e}")
      continue
    pixels = images.preprocess_uint8(image, config)["pixel_values"]
    views.append(pixels[:1] if global_view_only else pixels)
    captions.append(caption)
  if not views:
    raise ValueError(f"{json_path}: no usable captioned image among {len(rows)} records")
  if bad:
    log(f"vision pretraining: {bad} of {len(rows)} records of {json_path} skipped")
  return np.stack(views), captions


class TagHead(nn.Module):
  """The vision tower and a linear tag head on [mean, max] of each view's tokens."""
  config: TinyVLMConfig
  num_tags: int

  @nn.compact
  def __call__(self, pixel_values):  # [B, V, S, S, 3] -> tag logits [B, T]
    b, v = pixel_values.shape[:2]
    feats, _ = SiglipVisionTower(self.config.vision, name="vision")(pixel_values.reshape((b * v,) + pixel_values.shape[2:]))
    feats = feats.reshape((b, v) + feats.shape[1:]).astype(jnp.float32)  # [B, V, P, D]
    # The max through the argmax's element: its gradient goes to that element alone. jnp.max's own
    # gradient divides by the count of elements equal to the max, and an XLA:CPU build at
    # optimisation level 0 computed `feats` twice with different roundings: a count of 0, NaN.
    top = jnp.take_along_axis(feats, jnp.argmax(feats, axis=2)[:, :, None], axis=2)[:, :, 0]  # [B, V, D]
    pooled = jnp.concatenate([feats.mean(axis=2), top], axis=-1)  # [B, V, 2D]
    return nn.Dense(self.num_tags, name="head")(pooled.reshape(b, -1))


def _multi_hot(captions, vocab: list[str]) -> np.ndarray:
  index = {t: i for i, t in enumerate(vocab)}
  out = np.zeros((len(captions), len(vocab)), np.float32)
  for row, caption in enumerate(captions):
    for tag in caption_tags(caption):
      if tag in index:
        out[row, index[tag]] = 1.0
  return out


def tag_f1(logits: np.ndarray, targets: np.ndarray) -> float:
  """Micro-F1 of the tags predicted present (logit > 0)."""
  pred = logits > 0
  tp = float(np.sum(pred & (targets > 0)))
  return 2 * tp / max(float(np.sum(pred)) + float(np.sum(targets > 0)), 1.0)


def pretrain(train_json: str, out_dir: str, config: TinyVLMConfig, pcfg: PretrainConfig, *,
             heldout_json: str | None = None, log: Callable[[str], None] = print) -> dict:
  """Pretrains the vision tower on the captions of `train_json`; writes a model folder to `out_dir`.

  Returns (and writes to out_dir/vision_pretrain.json) the steps, seconds, the tag vocabulary
  and, with `heldout_json`, the held-out loss and tag micro-F1. A folder that already holds a
  finished pretraining of the same number of steps is reused as it is (another number is an error).
  """
  results_path = os.path.join(out_dir, RESULTS_FILE)
  if os.path.isfile(results_path) and os.path.isfile(os.path.join(out_dir, model_io.CONFIG_FILE)):
    with open(results_path) as f:
      done = json.load(f)
    if done.get("steps") != pcfg.steps:
      raise ValueError(f"{out_dir} holds a vision pretraining of {done.get('steps')} steps, the config asks for "
                       f"{pcfg.steps}: use a new workdir, or delete that folder to pretrain again")
    log(f"vision pretraining: finished earlier ({done['steps']} steps); using {out_dir}")
    return done
  start = time.perf_counter()
  train_views, train_captions = load_captioned_images(train_json, config, global_view_only=pcfg.global_view_only,
                                                      log=log)
  vocab = sorted(set().union(*(caption_tags(c) for c in train_captions)))
  targets = _multi_hot(train_captions, vocab)
  model = TagHead(config, len(vocab))
  # uint8 -> model input on the device, through normalize_vit's own table (the same bits).
  table = jnp.asarray(images.normalize_vit(np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, axis=1)))  # [256, 3]
  normalize = lambda x: table[x.astype(jnp.int32), jnp.arange(3)]
  rng = np.random.default_rng(pcfg.seed)
  params = model.init(jax.random.PRNGKey(pcfg.seed), images.normalize_vit(train_views[:1]))["params"]
  decay_steps = max(pcfg.steps, pcfg.warmup_steps + 1)
  schedule = optax.warmup_cosine_decay_schedule(0.0, pcfg.lr, pcfg.warmup_steps, decay_steps, 0.05 * pcfg.lr)
  tx = optax.chain(optax.clip_by_global_norm(pcfg.clip_norm), optax.adamw(schedule, weight_decay=0.0))
  opt_state = tx.init(params)

  def loss_fn(p, x, y):
    logits = model.apply({"params": p}, normalize(x))
    return jnp.mean(jnp.sum(optax.sigmoid_binary_cross_entropy(logits, y), axis=-1))

  @jax.jit
  def train_step(p, state, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(p, x, y)
    updates, state = tx.update(grads, state, p)
    return optax.apply_updates(p, updates), state, loss

  batch = min(pcfg.batch_size, len(train_views))
  order, pos, losses = rng.permutation(len(train_views)), 0, []
  for step in range(1, pcfg.steps + 1):
    if pos + batch > len(order):  # a fresh shuffle each epoch
      order, pos = rng.permutation(len(train_views)), 0
    idx = np.sort(order[pos:pos + batch])
    pos += batch
    params, opt_state, loss = train_step(params, opt_state, train_views[idx], targets[idx])
    losses.append(loss)  # read back every 100 steps, so the host does not wait on each step
    if step % 100 == 0 or step == pcfg.steps:
      losses[-100:] = [float(x) for x in jax.device_get(losses[-100:])]
      bad = [i for i, x in enumerate(losses) if not np.isfinite(x)]
      if bad:
        raise FloatingPointError(f"vision pretraining: the loss is {losses[bad[0]]} at step {bad[0] + 1}")
      log(f"vision pretraining: step {step}/{pcfg.steps}, loss {np.mean(losses[-20:]):.3f}")
  result = {"steps": pcfg.steps, "batch_size": batch, "tags": vocab,
            "first_loss": losses[0] if losses else None, "last_loss": float(np.mean(losses[-20:])) if losses else None}
  if heldout_json is not None:
    views, captions = load_captioned_images(heldout_json, config, global_view_only=pcfg.global_view_only, log=log)
    predict = jax.jit(lambda p, x: model.apply({"params": p}, normalize(x)))
    logits = np.concatenate([np.asarray(predict(params, views[i:i + 100]))
                             for i in range(0, len(views), 100)])
    y = _multi_hot(captions, vocab)
    result["heldout_loss"] = float(np.mean(np.sum(np.asarray(optax.sigmoid_binary_cross_entropy(logits, y)), -1)))
    result["heldout_tag_f1"] = tag_f1(logits, y)
  full = jax.device_get(init_params(config, jax.random.PRNGKey(pcfg.seed)))
  full["vision"] = jax.device_get(params["vision"])
  model_io.save_model(out_dir, full, config, overwrite=True)
  result["seconds"] = round(time.perf_counter() - start, 1)
  if jax.process_index() == 0:
    with open(results_path, "w") as f:
      json.dump(result, f, indent=1)
  summary = f"loss {result['first_loss']:.3f} -> {result['last_loss']:.3f}; " if losses else ""
  if heldout_json is not None:
    summary += f"held-out tag F1 {result['heldout_tag_f1']:.3f}; "
  log(f"vision pretraining: {pcfg.steps} steps in {result['seconds']:.0f} s; {summary}tower in {out_dir}")
  return result
