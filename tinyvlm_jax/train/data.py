"""The stage's input pipeline from `config.data`: named sources, mixing weights, text-only streams.

  config.data.sources.NAME = {kind, path, image_root, weight}
    kind: llava_json | jsonl | cauldron_parquet | lnqa_parquet | sharegpt_text | mathinstruct
    path: a file, or a glob (parquet shards: "/data/the_cauldron/*/train-*.parquet")

Each process builds the same pipeline with its own `process_index`; the pipeline shards
every source by process (records i, i+n, i+2n, ...), so a process reads only its share and
yields `global_batch_size / process_count` rows per step.
"""

from __future__ import annotations

import glob
import os
from typing import Any

import jax
import numpy as np

from tinyvlm_jax.data import pipeline as pipeline_lib
from tinyvlm_jax.data import readers
from tinyvlm_jax.models.config import TinyVLMConfig

_IMAGE_KINDS = {"llava_json": readers.llava_json, "jsonl": readers.jsonl}
_PARQUET_KINDS = {"cauldron_parquet": readers.cauldron_parquet, "lnqa_parquet": readers.lnqa_parquet}
_TEXT_KINDS = {"sharegpt_text": readers.sharegpt_text, "mathinstruct": readers.mathinstruct}
KINDS = sorted({**_IMAGE_KINDS, **_PARQUET_KINDS, **_TEXT_KINDS})


def _paths(pattern: str, name: str) -> list[str]:
  if not pattern:
    raise ValueError(f"data source {name!r} has no path: set --config.data.sources.{name}.path")
  paths = sorted(glob.glob(os.path.expanduser(pattern)))
  if not paths:
    raise FileNotFoundError(f"data source {name!r}: no file matches {pattern!r}")
  return paths


def make_source(name: str, spec) -> Any:
  """One reader from a source entry of the config."""
  kind, image_root = spec.get("kind", ""), spec.get("image_root", "") or None
  paths = _paths(spec.get("path", ""), name)
  if kind in _PARQUET_KINDS:
    return _PARQUET_KINDS[kind](paths, image_root=image_root, name=name)
  if len(paths) != 1:
    raise ValueError(f"data source {name!r} ({kind}) matches {len(paths)} files; give one file")
  if kind in _IMAGE_KINDS:
    return _IMAGE_KINDS[kind](paths[0], image_root, name=name)
  if kind in _TEXT_KINDS:
    return _TEXT_KINDS[kind](paths[0], name=name)
  raise ValueError(f"data source {name!r}: unknown kind {kind!r}; expected one of {KINDS}")


class SubsetSource:
  """A fixed subset of a random-access source (picklable, for grain workers)."""

  def __init__(self, source, indices: np.ndarray):
    self.source = source
    self.indices = np.asarray(indices, np.int64)
    self.name = f"{getattr(source, 'name', 'source')}[subset {len(self.indices)}]"

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, i):
    return self.source[int(self.indices[i])]


def subset_sources(sources: list, weights: list[float], total: int, seed: int) -> list[SubsetSource]:
  """`total` records drawn without replacement, split over the sources by mixing weight (stage 3's 400 K)."""
  sizes = np.array([len(s) for s in sources])
  share = np.asarray(weights, float) / np.sum(weights)
  counts = np.minimum(np.floor(share * total).astype(int), sizes)
  rng = np.random.default_rng(seed)
  return [SubsetSource(src, np.sort(rng.choice(n, size=k, replace=False))) for src, n, k in zip(sources, sizes, counts)]


def per_process_batch(global_batch_size: int) -> int:
  n = jax.process_count()
  if global_batch_size % n:
    raise ValueError(f"global_batch_size={global_batch_size} does not split over {n} processes")
  return global_batch_size // n


def make_pipeline(cfg, model_cfg: TinyVLMConfig) -> pipeline_lib.Pipeline:
  """The stage's Pipeline for this process."""
  data = cfg.data
  if not data.sources:
    raise ValueError(f"stage {cfg.stage!r} has no data sources: set config.data.sources.NAME.path/kind")
  names = sorted(data.sources)
  sources = [make_source(n, data.sources[n]) for n in names]
  weights = [float(data.sources[n].get("weight", 1.0)) for n in names]
  if data.subset:
    sources = subset_sources(sources, weights, int(data.subset), data.seed)
  text = make_source("text_source", data.text_source) if data.text_source.get("path") else None
  math = make_source("math_source", data.math_source) if data.math_source.get("path") else None
  if data.text_every and text is None:
    raise ValueError(f"data.text_every={data.text_every} but data.text_source.path is empty")
  if data.math_every and math is None:
    raise ValueError(f"data.math_every={data.math_every} but data.math_source.path is empty")
  pcfg = pipeline_lib.PipelineConfig(
      batch_size=per_process_batch(cfg.global_batch_size), max_len=data.max_len, seed=data.seed,
      worker_count=data.worker_count, max_bad_fraction=data.max_bad_fraction, caption_only=data.caption_only,
      text_every=data.text_every, math_every=data.math_every, tokenizer_path=data.tokenizer_path or None)
  return pipeline_lib.Pipeline(sources, model_cfg=model_cfg, config=pcfg, weights=weights if len(names) > 1 else None,
                               text_source=text, math_source=math)


class Prefetcher:
  """Reads the next batches in a background thread while the device computes.

  Each batch comes with the pipeline's state right after it was read, so a checkpoint
  taken after training on batch N records exactly "N batches consumed", whatever has been
  read ahead. `get_state()` returns that state for the batch last handed out.
  """

  def __init__(self, pipeline, depth: int = 2):
    import queue  # pylint: disable=g-import-not-at-top
    import threading  # pylint: disable=g-import-not-at-top
    self.pipeline = pipeline
    self._state = pipeline.get_state()
    self._queue = queue.Queue(maxsize=depth)
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, name="prefetch", daemon=True)
    self._thread.start()

  def _run(self) -> None:
    while not self._stop.is_set():
      try:
        item = (next(self.pipeline), self.pipeline.get_state(), None)
      except BaseException as e:  # pylint: disable=broad-except  (StopIteration and errors go to the reader)
        item = (None, None, e)
      while not self._stop.is_set():
        try:
          self._queue.put(item, timeout=0.1)
          break
        except Exception:  # queue.Full
          continue
      if item[2] is not None:
        return

  def __iter__(self):
    return self

  def __next__(self):
    batch, state, error = self._queue.get()
    if error is not None:
      raise error
    self._state = state
    return batch

  def get_state(self):
    return self._state

  def close(self) -> None:
    self._stop.set()
    self._thread.join(timeout=30)
