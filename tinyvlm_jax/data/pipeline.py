"""The grain input pipeline: records -> fixed-shape batches, with exact bad-record accounting.

  each source --seeded shuffle--> shard [process_index::process_count] --> repeat(num_epochs)
    --> mix by weight --> EncodeExample (worker processes: decode image, preprocess, encode_chat)
    --> example or bad marker --> Pipeline (main process: count, filter, pad, batch)

The per-record transform never raises for bad data: it returns a small marker
`{"bad": reason, "id": ...}` instead, so counting, filtering and batching happen in the
main process, where the counts are exact whatever the number of workers and are part of
the saved iterator state. Stage 2's text-only batches come from their own streams: every
`text_every`-th batch from `text_source`, every `math_every`-th from `math_source` (math
wins when both fall on the same step).

Batches (numpy, static shapes, RIGHT padding with the tokenizer's pad id):
  input_ids [B, L] int32, loss_mask [B, L] bool, attention_mask [B, L] int32 (1 = real token),
  positions [B, L] int32 (0..n-1 on real tokens, 0 on padding), pixel_values [B, V, S, S, 3]
  float32, cnn_pixel_values [B, C, C, 3] float32, has_image [B] bool (text rows: zero images),
  example_key [B] int32 (a hash of the record's source and id, 0 on empty rows: NEFTune's noise
  key, so a record's noise does not depend on which process or batch row it lands in).
"""

from __future__ import annotations

import dataclasses
import logging
import zlib
from typing import Any, Mapping, Sequence

import grain
import numpy as np

from tinyvlm_jax import cpu_runtime
from tinyvlm_jax.data import chat
from tinyvlm_jax.data import images
from tinyvlm_jax.data import readers
from tinyvlm_jax.data import tokenizer as tokenizer_lib
from tinyvlm_jax.models.config import TinyVLMConfig

logger = logging.getLogger(__name__)

MAIN, TEXT, MATH = "main", "text", "math"


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
  """What the pipeline does; `from_dict` also takes an `ml_collections.ConfigDict`."""
  batch_size: int = 16
  max_len: int = 2048
  seed: int = 0
  shuffle: bool = True
  # None: repeat forever (the text/math streams always repeat). With several main sources an
  # epoch ends when the first one, scaled by its weight, runs out (grain's mix).
  num_epochs: int | None = None
  worker_count: int = 0              # grain worker processes; 0: everything in this process
  worker_buffer_size: int = 2        # examples buffered per worker
  read_threads: int = 1              # threads per process reading and transforming records
  read_buffer_size: int = 16         # examples read ahead per process
  max_bad_fraction: float = 0.01
  min_records_for_bad_check: int = 100  # the fraction is checked once this many were seen (and at the end)
  max_pixels: int = images.DEFAULT_MAX_PIXELS
  caption_only: bool = False         # stage 1: the caption alone carries the loss
  text_every: int = 25               # 0 disables
  math_every: int = 100              # 0 disables
  drop_remainder: bool = True        # at the end of the data: drop a short last batch, else pad it with empty rows
  with_ids: bool = False             # add "id" [B] (str) to batches, for tests and debugging
  tokenizer_path: str | None = None  # None: the offline Qwen2.5 tokenizer (tokenizer.load_tokenizer)
  system: str | None = chat.DEFAULT_SYSTEM  # None: no system turn (one in the data still counts)

  @classmethod
  def from_dict(cls, values: Mapping[str, Any]) -> "PipelineConfig":
    if hasattr(values, "to_dict"):
      values = values.to_dict()
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
      raise ValueError(f"PipelineConfig: unknown field(s) {unknown}; known fields are {sorted(known)}")
    return cls(**values)


class TooManyBadRecords(RuntimeError):
  """More than `max_bad_fraction` of the records seen were bad; `counts` holds them by reason."""

  def __init__(self, seen: int, counts: Mapping[str, int], max_fraction: float):
    self.seen = seen
    self.counts = dict(counts)
    bad = sum(self.counts.values())
    listing = ", ".join(f"{reason}: {n}" for reason, n in sorted(self.counts.items()))
    super().__init__(
        f"{bad} of {seen} records were bad ({bad / max(seen, 1):.2%}), more than max_bad_fraction="
        f"{max_fraction:.2%}: {listing}. Fix the data or raise max_bad_fraction.")


# ------------------------------------------------------------------------------------------
# Per-record transform (runs in the worker processes).

def example_key(source: str, rid: str) -> int:
  """A stable non-negative int32 per record (crc32 of source and id), the same on every process."""
  return zlib.crc32(f"{source}\x00{rid}".encode()) & 0x7FFFFFFF


def _bad(rid: str, source: str, reason: str, detail: str) -> dict:
  return {"bad": reason, "id": rid, "source": source, "detail": detail}


class EncodeExample(grain.transforms.Map):
  """Record -> {id, source, input_ids [n], loss_mask [n], (uint8 pixel_values, cnn_pixel_values)} or a bad marker."""

  def __init__(self, model_cfg: TinyVLMConfig, cfg: PipelineConfig):
    self.model_cfg = model_cfg
    self.cfg = cfg

  def map(self, record: readers.Record | readers.BadRecord) -> dict:
    if isinstance(record, readers.BadRecord):
      return _bad(record.id, "", record.reason, record.detail)
    rid, source, cfg = record["id"], record["source"], self.cfg
    tok = tokenizer_lib.load_tokenizer(cfg.tokenizer_path)  # cached per process
    try:
      # At most max_len tokens: later exchanges dropped, or DropExample("too_long") when no answer fits.
      enc = chat.encode_chat(record["messages"], tok, max_len=cfg.max_len,
                             num_image_tokens=self.model_cfg.num_visual_tokens,
                             image_token_id=self.model_cfg.image_token_id,
                             system=cfg.system, caption_only=cfg.caption_only)
    except chat.DropExample as e:
      return _bad(rid, source, e.reason, str(e))
    out = {"id": rid, "source": source, "input_ids": np.asarray(enc.ids, np.int32),
           "loss_mask": np.asarray(enc.loss_mask, bool)}
    if enc.has_image != (record["image"] is not None):
      if record["image"] is None:
        return _bad(rid, source, "missing_image", "the conversation has an <image> placeholder but no image")
      return _bad(rid, source, "no_image_placeholder", "an image but no <image> placeholder in a user turn")
    if enc.has_image:
      try:
        image = images.load_image(record["image"], max_pixels=cfg.max_pixels, name=rid)
      except images.ImageError as e:
        return _bad(rid, source, e.reason, str(e))
      # uint8 pixel_values [V, S, S, 3] and cnn_pixel_values [C, C, 3]: a quarter of float32's bytes
      # between processes; the main process normalises them into the batch (_collate).
      out.update(images.preprocess_uint8(image, self.model_cfg))
    return out


# ------------------------------------------------------------------------------------------
# grain graph for one stream.


def _source_seed(seed: int, stream: str, k: int) -> int:
  return int(np.random.SeedSequence([seed, (MAIN, TEXT, MATH).index(stream), k]).generate_state(1)[0])


def _mark_flags_parsed() -> None:
  """grain's worker processes read absl flags; outside an absl app nothing parsed them: use the defaults."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _init_worker(worker_index: int, worker_count: int) -> None:
  """In each worker process: keep freed memory in the heap. Every example allocates megabytes of
  views, which glibc would otherwise map and unmap each time (a third more worker CPU, in the kernel)."""
  del worker_index, worker_count
  cpu_runtime.keep_freed_memory()


def _stream_dataset(sources: Sequence, weights: Sequence[float] | None, *, stream: str, num_epochs: int | None,
                    model_cfg: TinyVLMConfig, cfg: PipelineConfig, process_index: int,
                    process_count: int) -> grain.IterDataset:
  """sources -> shuffle -> shard -> repeat -> mix -> EncodeExample -> (worker processes)."""
  parts = []
  for k, src in enumerate(sources):
    ds = grain.MapDataset.source(src)
    if cfg.shuffle:
      ds = ds.shuffle(seed=_source_seed(cfg.seed, stream, k))
    ds = ds[process_index::process_count]  # the same permutation on every process: disjoint shards
    if len(ds) == 0:
      raise ValueError(f"{stream} source {getattr(src, 'name', src)!r} has {len(src)} records: "
                       f"nothing for process {process_index} of {process_count}")
    parts.append(ds.repeat(num_epochs) if num_epochs != 1 else ds)
  if len(parts) == 1:
    ds = parts[0]
  else:
    if weights is not None and len(weights) != len(parts):
      raise ValueError(f"{len(weights)} mixing weights for {len(parts)} {stream} sources")
    ds = grain.MapDataset.mix(parts, weights)
  ds = ds.map(EncodeExample(model_cfg, cfg))
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg.read_threads, prefetch_buffer_size=cfg.read_buffer_size))
  if cfg.worker_count > 0:
    _mark_flags_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.worker_count,
                                                     per_worker_buffer_size=cfg.worker_buffer_size),
                         worker_init_fn=_init_worker)
  return it


# ------------------------------------------------------------------------------------------
# The consumer (main process).


class Pipeline(grain.DatasetIterator):
  """Iterator of fixed-shape batches; `get_state` / `set_state` resume exactly, `stats` counts bad records.

  A grain `DatasetIterator`, so orbax saves it with grain's handler
  (`grain.checkpoint.CheckpointSave(pipeline)` / `CheckpointRestore(pipeline)`): one JSON file per process.

  Args:
    sources: the main readers (grain random-access sources of records), mixed by `weights`.
    model_cfg: gives the image tensor shapes and the number of visual tokens.
    config: a `PipelineConfig` (or a mapping of its fields).
    text_source, math_source: stage 2's text-only readers (OpenHermes, MathInstruct).
    process_index, process_count: this host's shard; default `jax.process_index()` / `jax.process_count()`.
  """

  def __init__(self, sources: Sequence | Any, *, model_cfg: TinyVLMConfig,
               config: PipelineConfig | Mapping[str, Any] = PipelineConfig(),
               weights: Sequence[float] | None = None, text_source=None, math_source=None,
               process_index: int | None = None, process_count: int | None = None):
    super().__init__()
    cfg = config if isinstance(config, PipelineConfig) else PipelineConfig.from_dict(config)
    if process_index is None or process_count is None:
      import jax  # pylint: disable=g-import-not-at-top
      process_index = jax.process_index() if process_index is None else process_index
      process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index={process_index} is not in [0, process_count={process_count})")
    if cfg.batch_size <= 0 or cfg.max_len <= 0:
      raise ValueError(f"batch_size and max_len must be positive, got {cfg.batch_size} and {cfg.max_len}")
    sources = list(sources) if isinstance(sources, (list, tuple)) else [sources]
    self.cfg = cfg
    self.model_cfg = model_cfg
    self.pad_id = int(tokenizer_lib.load_tokenizer(cfg.tokenizer_path).pad_id)
    common = dict(model_cfg=model_cfg, cfg=cfg, process_index=process_index, process_count=process_count)
    self._datasets = {MAIN: _stream_dataset(sources, weights, stream=MAIN, num_epochs=cfg.num_epochs, **common)}
    if text_source is not None and cfg.text_every > 0:
      self._datasets[TEXT] = _stream_dataset([text_source], None, stream=TEXT, num_epochs=None, **common)
    if math_source is not None and cfg.math_every > 0:
      self._datasets[MATH] = _stream_dataset([math_source], None, stream=MATH, num_epochs=None, **common)
    self._iters: dict[str, Any] = {}
    self._step = 0
    self._seen = 0
    self._bad: dict[str, int] = {}
    self._exhausted = False
    self._logged: set[str] = set()

  # -- schedule and iteration

  def stream_for_step(self, step: int) -> str:
    """Which stream gives batch number `step` (0-based): math, text or main."""
    k = step + 1
    if MATH in self._datasets and k % self.cfg.math_every == 0:
      return MATH
    if TEXT in self._datasets and k % self.cfg.text_every == 0:
      return TEXT
    return MAIN

  def _iter(self, stream: str):
    if stream not in self._iters:
      self._iters[stream] = iter(self._datasets[stream])
    return self._iters[stream]

  def __next__(self) -> dict[str, np.ndarray]:
    self._assert_not_closed()
    if self._exhausted:
      raise StopIteration
    stream = self.stream_for_step(self._step)
    it = self._iter(stream)
    rows = []
    while len(rows) < self.cfg.batch_size:
      try:
        ex = next(it)
      except StopIteration:
        self._exhausted = True
        self._check_bad(final=True)
        if not rows or self.cfg.drop_remainder:
          raise
        break
      self._seen += 1
      if "bad" in ex:
        self._count_bad(ex)
      else:
        rows.append(ex)
      self._check_bad(final=False)
    self._step += 1
    return self._collate(rows)

  def _count_bad(self, ex: dict) -> None:
    reason = ex["bad"]
    self._bad[reason] = self._bad.get(reason, 0) + 1
    if reason not in self._logged:
      self._logged.add(reason)
      logger.warning("skipping bad record %s%s (%s): %s; further %r records are counted, not logged",
                     ex["id"], f" from {ex['source']}" if ex["source"] else "", reason, ex["detail"], reason)

  def _check_bad(self, final: bool) -> None:
    bad = sum(self._bad.values())
    if not bad or (not final and self._seen < self.cfg.min_records_for_bad_check):
      return
    if bad > self.cfg.max_bad_fraction * self._seen:
      raise TooManyBadRecords(self._seen, self._bad, self.cfg.max_bad_fraction)

  def _collate(self, rows: list[dict]) -> dict[str, np.ndarray]:
    b, length, m = self.cfg.batch_size, self.cfg.max_len, self.model_cfg
    v, s, c = m.num_views, m.vision.image_size, m.cnn.image_size
    batch = {
        "input_ids": np.full((b, length), self.pad_id, np.int32),
        "loss_mask": np.zeros((b, length), bool),
        "attention_mask": np.zeros((b, length), np.int32),
        "positions": np.zeros((b, length), np.int32),
        "pixel_values": np.zeros((b, v, s, s, 3), np.float32),  # text-only and empty rows: zero images
        "cnn_pixel_values": np.zeros((b, c, c, 3), np.float32),
        "has_image": np.zeros((b,), bool),
        "example_key": np.zeros((b,), np.int32),
    }
    for i, ex in enumerate(rows):
      batch["example_key"][i] = example_key(ex["source"], ex["id"])
      n = len(ex["input_ids"])
      batch["input_ids"][i, :n] = ex["input_ids"]
      batch["loss_mask"][i, :n] = ex["loss_mask"]
      batch["attention_mask"][i, :n] = 1
      batch["positions"][i, :n] = np.arange(n, dtype=np.int32)
      if "pixel_values" in ex:
        images.normalize_vit(ex["pixel_values"], out=batch["pixel_values"][i])
        images.normalize_cnn(ex["cnn_pixel_values"], out=batch["cnn_pixel_values"][i])
        batch["has_image"][i] = True
    if self.cfg.with_ids:
      batch["id"] = np.array([ex["id"] for ex in rows] + [""] * (b - len(rows)))
    return batch

  # -- state

  def stats(self) -> dict[str, Any]:
    """{"seen": records read (good and bad), "bad": {reason: count}}."""
    return {"seen": self._seen, "bad": dict(self._bad)}

  def get_state(self) -> dict[str, Any]:
    """A JSON-serialisable state: after `set_state` of it the next batch is the one that would have come."""
    return {
        "step": self._step, "seen": self._seen, "bad": dict(self._bad), "exhausted": self._exhausted,
        "streams": {stream: it.get_state() for stream, it in self._iters.items()},
    }

  def set_state(self, state: Mapping[str, Any]) -> None:
    unknown = sorted(set(state["streams"]) - set(self._datasets))
    if unknown:
      raise ValueError(f"pipeline state has stream(s) {unknown} that this pipeline does not have "
                       f"({sorted(self._datasets)}): was it saved with other text/math sources?")
    self._step = int(state["step"])
    self._seen = int(state["seen"])
    self._bad = {str(k): int(v) for k, v in state["bad"].items()}
    self._exhausted = bool(state["exhausted"])
    for stream in list(self._iters):
      if stream not in state["streams"]:
        self._iters.pop(stream).close()
    for stream, stream_state in state["streams"].items():
      self._iter(stream).set_state(stream_state)

  def start_prefetch(self) -> None:
    """Starts the workers of every stream now (e.g. right after a restore), not at the first batch."""
    for stream in self._datasets:
      self._iter(stream).start_prefetch()

  def close(self) -> None:
    """Stops the worker processes; the pipeline cannot be used afterwards."""
    for it in getattr(self, "_iters", {}).values():
      it.close()
    self._iters = {}
    super().close()

  def __enter__(self) -> "Pipeline":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
