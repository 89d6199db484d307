"""Batched, JIT-compiled generation for TinyVLM (and the bare Qwen2 decoder).

Prompts are left-padded to one of a few length buckets and the KV cache has a fixed size,
so a run compiles a handful of programs (gemma's sampler). The image's visual tokens are
computed once; prefill writes the whole prompt into the cache; a `lax.while_loop` inside
jit then decodes until every row has hit a stop id or the token budget.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tinyvlm_jax.models.config import QwenConfig, TinyVLMConfig
from tinyvlm_jax.models.qwen2 import Qwen2ForCausalLM, init_cache
from tinyvlm_jax.models.tinyvlm import TinyVLM


@dataclasses.dataclass(frozen=True)
class Sampling:
  """temperature 0 is greedy; top_k 0 and top_p 1.0 switch those filters off."""
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0


def sample_next(logits, rng, sampling: Sampling):
  """logits [B, V] -> token ids [B]."""
  if sampling.temperature <= 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / sampling.temperature
  if sampling.top_k > 0:
    kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if sampling.top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    # keep the smallest prefix whose mass reaches top_p (always at least the best token)
    cutoff_index = jnp.sum(cum < sampling.top_p, axis=-1, keepdims=True)
    cutoff = jnp.take_along_axis(sorted_logits, cutoff_index, axis=-1)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def bucket_length(n: int, buckets: Sequence[int]) -> int:
  """Smallest bucket >= n; beyond the last bucket, the next multiple of it."""
  for b in sorted(buckets):
    if n <= b:
      return b
  top = max(buckets)
  return -(-n // top) * top


def left_pad(prompts: Sequence[Sequence[int]], length: int, pad_id: int):
  """Token lists -> ids [B, length], mask [B, length] (1 = real), right-aligned."""
  ids = np.full((len(prompts), length), pad_id, np.int32)
  mask = np.zeros((len(prompts), length), np.int32)
  for i, p in enumerate(prompts):
    if len(p) > length:
      raise ValueError(f"prompt {i} has {len(p)} tokens, more than the padded length {length}")
    if len(p):
      ids[i, length - len(p):] = p
      mask[i, length - len(p):] = 1
  return ids, mask


@dataclasses.dataclass
class DecodeState:
  """Carried through the decode loop (a pytree)."""
  step: jax.Array        # [] tokens generated so far
  last: jax.Array        # [B] last token
  done: jax.Array        # [B] row has emitted a stop id
  tokens: jax.Array      # [B, max_new] generated ids (pad after stop)
  cache: list
  kv_mask: jax.Array     # [B, S] valid cache slots
  next_pos: jax.Array    # [B] position id of the next token
  rng: jax.Array


jax.tree_util.register_dataclass(
    DecodeState, data_fields=[f.name for f in dataclasses.fields(DecodeState)], meta_fields=[])


class LMDecoder:
  """Prefill and decode for a Qwen2 decoder given its input embeddings (text or text + image)."""

  def __init__(self, config: QwenConfig, *, stop_ids: Sequence[int], pad_id: int, cache_dtype=None):
    self.config = config
    self.model = Qwen2ForCausalLM(config)
    self.stop_ids = tuple(int(s) for s in stop_ids)
    self.pad_id = int(pad_id)
    self.cache_dtype = cache_dtype or jnp.dtype(config.dtype)
    self._prefill = jax.jit(self._prefill_impl, static_argnames=("max_new", "sampling"))
    self._decode = jax.jit(self._decode_impl, static_argnames=("sampling",), donate_argnames=("state",))

  def _prefill_impl(self, params, embeds, mask, rng, *, max_new: int, sampling: Sampling) -> DecodeState:
    """embeds [B, L, D], mask [B, L] (left padded) -> state after the first new token."""
    b, length = mask.shape
    cache = init_cache(self.config, b, length + max_new, self.cache_dtype)
    kv_mask = jnp.concatenate([mask, jnp.ones((b, max_new), mask.dtype)], axis=1)  # [B, S]
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0).astype(jnp.int32)
    logits, cache = self.model.apply({"params": params}, inputs_embeds=embeds, positions=positions,
                                     attention_mask=kv_mask, cache=cache, cache_index=jnp.int32(0),
                                     last_only=True)
    rng, key = jax.random.split(rng)
    first = sample_next(logits[:, -1], key, sampling)
    tokens = jnp.full((b, max_new), self.pad_id, jnp.int32).at[:, 0].set(first)
    return DecodeState(step=jnp.int32(1), last=first, done=jnp.isin(first, jnp.array(self.stop_ids)),
                       tokens=tokens, cache=cache, kv_mask=kv_mask,
                       next_pos=jnp.sum(mask, axis=1).astype(jnp.int32), rng=rng)

  def _decode_impl(self, params, state: DecodeState, until, *, sampling: Sampling) -> DecodeState:
    """Decodes inside one while_loop until step == until or every row is done."""
    max_new = state.tokens.shape[1]
    prompt_len = state.kv_mask.shape[1] - max_new
    stop = jnp.array(self.stop_ids)

    def cond(s: DecodeState):
      return (s.step < jnp.minimum(until, max_new)) & ~jnp.all(s.done)

    def body(s: DecodeState):
      embeds = self.model.apply({"params": params}, s.last[:, None], method="embed")
      logits, cache = self.model.apply({"params": params}, inputs_embeds=embeds, positions=s.next_pos[:, None],
                                       attention_mask=s.kv_mask, cache=s.cache,
                                       cache_index=prompt_len + s.step - 1)
      rng, key = jax.random.split(s.rng)
      nxt = sample_next(logits[:, -1], key, sampling)
      nxt = jnp.where(s.done, self.pad_id, nxt)
      tokens = jax.lax.dynamic_update_slice(s.tokens, nxt[:, None], (0, s.step))
      return DecodeState(step=s.step + 1, last=nxt, done=s.done | jnp.isin(nxt, stop), tokens=tokens,
                         cache=cache, kv_mask=s.kv_mask, next_pos=s.next_pos + 1, rng=rng)

    return jax.lax.while_loop(cond, body, state)

  def generate(self, params, embeds, mask, *, max_new_tokens: int, sampling: Sampling = Sampling(),
               rng=None, chunk: int | None = None) -> Iterator[np.ndarray]:
    """Yields the generated ids [B, max_new_tokens] so far, after prefill and after each chunk of steps."""
    rng = jax.random.key(0) if rng is None else rng
    state = self._prefill(params, embeds, mask, rng, max_new=max_new_tokens, sampling=sampling)
    # Sliced on the host: a device slice per new length would compile a program for each chunk.
    yield np.asarray(state.tokens)[:, :1]
    chunk = chunk or max_new_tokens
    while True:
      step = int(state.step)
      if step >= max_new_tokens or bool(jnp.all(state.done)):
        break
      state = self._decode(params, state, jnp.int32(step + chunk), sampling=sampling)
      yield np.asarray(state.tokens)[:, :int(state.step)]


def strip_after_stop(tokens: np.ndarray, stop_ids: Sequence[int]) -> list[list[int]]:
  """[B, T] -> per-row ids up to (not including) the first stop id."""
  out = []
  for row in np.asarray(tokens).tolist():
    cut = next((i for i, t in enumerate(row) if t in stop_ids), len(row))
    out.append(row[:cut])
  return out


@dataclasses.dataclass
class GenerationStats:
  batches: int = 0
  prompts: int = 0
  new_tokens: int = 0
  vision_seconds: float = 0.0
  ttft_seconds: list = dataclasses.field(default_factory=list)  # per batch: vision + prefill + first token
  decode_seconds: float = 0.0
  shapes: set = dataclasses.field(default_factory=set)  # (batch, prompt bucket, max_new) compiled

  @property
  def compiled_programs(self) -> int:
    return len(self.shapes)

  @property
  def decode_tokens_per_second(self) -> float:
    return self.new_tokens / self.decode_seconds if self.decode_seconds else 0.0

  def summary(self) -> dict:
    ttft = np.asarray(self.ttft_seconds or [0.0])
    return dict(batches=self.batches, prompts=self.prompts, new_tokens=self.new_tokens,
                compiled_programs=self.compiled_programs, vision_seconds=round(self.vision_seconds, 4),
                ttft_p50=float(np.percentile(ttft, 50)), ttft_p90=float(np.percentile(ttft, 90)),
                decode_tokens_per_second=round(self.decode_tokens_per_second, 2))


# Steps of 64 from 512 to 1024: the full-size model's prompts are 769 visual tokens plus the
# text, so an 820-token prompt pads to 832 (the prefill then costs 7% less than at 896 and 19%
# less than at 1024), and each bucket adds one compiled program only when a prompt of that
# length comes.
DEFAULT_BUCKETS = (64, 128, 256, 512, 576, 640, 704, 768, 832, 896, 960, 1024, 1536, 2048)


class VLMGenerator:
  """TinyVLM generation: visual tokens once per image, bucketed left-padded prompts, jitted decode.

  With a `mesh`, the batch is split over its `data_axes` (data parallel); params are replicated.
  """

  def __init__(self, config: TinyVLMConfig, params, *, stop_ids: Sequence[int], pad_id: int,
               buckets: Sequence[int] = DEFAULT_BUCKETS, mesh: jax.sharding.Mesh | None = None,
               data_axes: tuple[str, ...] = ("data",)):
    self.config = config
    self.model = TinyVLM(config)
    self.params = params
    self.stop_ids = tuple(stop_ids)
    self.pad_id = pad_id
    self.buckets = tuple(buckets)
    self.decoder = LMDecoder(config.llm, stop_ids=stop_ids, pad_id=pad_id)
    self.stats = GenerationStats()
    self.mesh = mesh
    self.data_axes = data_axes
    self._encode = jax.jit(lambda p, px, cpx: self.model.apply({"params": p}, px, cpx, method="encode_images"))
    self._embed = jax.jit(lambda p, ids, vis: self.model.apply({"params": p}, ids, vis, method="embed_inputs"))
    if mesh is not None:
      self.params = jax.device_put(params, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))

  def _shard_batch(self, x):
    if self.mesh is None or x is None:
      return x
    spec = jax.sharding.PartitionSpec(self.data_axes, *([None] * (x.ndim - 1)))
    return jax.device_put(x, jax.sharding.NamedSharding(self.mesh, spec))

  def _batch_multiple(self) -> int:
    if self.mesh is None:
      return 1
    return int(np.prod([self.mesh.shape[a] for a in self.data_axes]))

  def stream(self, prompts: Sequence[Sequence[int]], pixel_values=None, cnn_pixel_values=None, *,
             max_new_tokens: int, sampling: Sampling = Sampling(), rng=None,
             chunk: int | None = None) -> Iterator[np.ndarray]:
    """Yields generated ids [B, t] as they grow. prompts: token lists holding the placeholder ids.

    pixel_values [B, V, S, S, 3] and cnn_pixel_values [B, C, C, 3] are numpy or jax arrays;
    None for a text-only batch.
    """
    n = len(prompts)
    mult = self._batch_multiple()
    b = -(-n // mult) * mult
    prompts = list(prompts) + [prompts[0]] * (b - n)  # pad the batch to a multiple of the data axes
    length = bucket_length(max(len(p) for p in prompts), self.buckets)
    ids, mask = left_pad(prompts, length, self.pad_id)

    def pad_rows(x):
      if x is None:
        return None
      x = np.asarray(x)
      return np.concatenate([x, np.repeat(x[:1], b - n, axis=0)]) if b > n else x

    start = time.perf_counter()
    visual = None
    if pixel_values is not None:
      visual = self._encode(self.params, self._shard_batch(pad_rows(pixel_values)),
                            self._shard_batch(pad_rows(cnn_pixel_values)))
      visual.block_until_ready()
    self.stats.vision_seconds += time.perf_counter() - start
    ids_dev, mask_dev = self._shard_batch(ids), self._shard_batch(mask)
    embeds = self._embed(self.params, ids_dev, visual)
    self.stats.shapes.add((b, length, max_new_tokens, pixel_values is not None))
    produced = 0
    t_first = None
    for tokens in self.decoder.generate(self.params["llm"], embeds, mask_dev, max_new_tokens=max_new_tokens,
                                        sampling=sampling, rng=rng, chunk=chunk):
      now = time.perf_counter()
      if t_first is None:
        t_first = now
        self.stats.ttft_seconds.append(now - start)
      produced = tokens.shape[1]
      yield tokens[:n]
    self.stats.decode_seconds += time.perf_counter() - t_first
    self.stats.batches += 1
    self.stats.prompts += n
    self.stats.new_tokens += (produced - 1) * n

  def generate(self, prompts, pixel_values=None, cnn_pixel_values=None, *, max_new_tokens: int,
               sampling: Sampling = Sampling(), rng=None) -> list[list[int]]:
    """Token lists in -> generated token lists out (stop ids removed)."""
    tokens = None
    for tokens in self.stream(prompts, pixel_values, cnn_pixel_values, max_new_tokens=max_new_tokens,
                              sampling=sampling, rng=rng):
      pass
    return strip_after_stop(tokens, self.stop_ids)
