"""Benchmark evaluation: read a benchmark file, generate in batches, parse, score, write results.

    OUT/predictions.jsonl   one {"id", "prediction", ...} per answered item, appended batch by batch
    OUT/results.json        metrics (EVAL.md), n, seconds, TTFT p50/p90, decode tokens/s, compiled programs

An interrupted run resumes: items whose id is already in predictions.jsonl are skipped.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Sequence

import numpy as np

from tinyvlm_jax.data.chat import encode_prompt
from tinyvlm_jax.data.images import DEFAULT_MAX_PIXELS, ImageError, load_image, preprocess
from tinyvlm_jax.eval.benchmarks import MAX_NEW_TOKENS, EvalItem, read_benchmark, score_benchmark
from tinyvlm_jax.models.config import TinyVLMConfig

log = logging.getLogger(__name__)

PREDICTIONS_FILE = "predictions.jsonl"
RESULTS_FILE = "results.json"


def read_predictions(path: str) -> dict[str, str]:
  """id -> prediction from a predictions.jsonl; a torn last line (a killed run) is ignored."""
  out = {}
  if not os.path.exists(path):
    return out
  with open(path) as f:
    for n, line in enumerate(f, 1):
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        log.warning("%s:%d: unreadable line skipped (an interrupted write?)", path, n)
        continue
      out[str(row["id"])] = row["prediction"]
  return out


def prepare_item(item: EvalItem, config: TinyVLMConfig, tokenizer, *, max_pixels: int = DEFAULT_MAX_PIXELS):
  """EvalItem -> (prompt ids, pixel_values [V,S,S,3], cnn_pixel_values [C,C,3]); no image -> zero pixels."""
  s, c = config.vision.image_size, config.cnn.image_size
  pixels = np.zeros((config.num_views, s, s, 3), np.float32)
  cnn = np.zeros((c, c, 3), np.float32)
  with_image = bool(item.images)
  if with_image:
    image = load_image(item.images[0], max_pixels=max_pixels, name=f"item {item.id}")
    views = preprocess(image, config)
    pixels, cnn = views["pixel_values"], views["cnn_pixel_values"]
  ids = encode_prompt(item.prompt, tokenizer, num_image_tokens=config.num_visual_tokens,
                      image_token_id=config.image_token_id, with_image=with_image)
  return ids, pixels, cnn


def evaluate(generator, config: TinyVLMConfig, tokenizer, items: Sequence[EvalItem], *, benchmark: str,
             out_dir: str, batch_size: int = 8, max_new_tokens: int | None = None, progress: bool = True,
             extra: dict | None = None) -> dict:
  """Generates answers for `items` not yet in OUT/predictions.jsonl, then scores all of them.

  `generator` is a `tinyvlm_jax.generate.VLMGenerator` (or anything with its `generate` and `stats`).
  """
  from tqdm import tqdm
  os.makedirs(out_dir, exist_ok=True)
  pred_path = os.path.join(out_dir, PREDICTIONS_FILE)
  done = read_predictions(pred_path)
  todo = [it for it in items if it.id not in done]
  max_new = max_new_tokens or MAX_NEW_TOKENS[benchmark]
  start = time.perf_counter()
  bad = 0
  with open(pred_path, "a") as out, tqdm(total=len(items), initial=len(items) - len(todo), disable=not progress,
                                         desc=benchmark, unit="q") as bar:
    for i in range(0, len(todo), batch_size):
      batch = todo[i:i + batch_size]
      prepared, rows = [], []
      for item in batch:
        try:
          prepared.append(prepare_item(item, config, tokenizer))
          rows.append(item)
        except (ImageError, ValueError) as e:  # a bad image is scored as an empty answer, not a crash
          bad += 1
          log.warning("%s: item %s: %s; scored as an empty answer", benchmark, item.id, e)
          out.write(json.dumps({"id": item.id, "prediction": "", "error": str(e)}) + "\n")
          done[item.id] = ""
      if rows:
        ids = [p[0].tolist() for p in prepared]
        pixels = np.stack([p[1] for p in prepared])
        cnn = np.stack([p[2] for p in prepared]) if config.use_cnn else None
        answers = generator.generate(ids, pixels, cnn, max_new_tokens=max_new)
        for item, answer in zip(rows, answers):
          text = tokenizer.decode(answer, skip_special=True).strip()
          done[item.id] = text
          out.write(json.dumps({"id": item.id, "prediction": text, "gold": item.gold}) + "\n")
      out.flush()
      bar.update(len(batch))
  seconds = time.perf_counter() - start
  stats = generator.stats.summary()
  results = dict(benchmark=benchmark, metrics=score_benchmark(benchmark, items, done), n=len(items),
                 generated_this_run=len(todo), bad_items=bad, seconds=round(seconds, 2),
                 ttft_p50=stats["ttft_p50"], ttft_p90=stats["ttft_p90"],
                 decode_tokens_per_second=stats["decode_tokens_per_second"],
                 compiled_programs=stats["compiled_programs"], batch_size=batch_size, max_new_tokens=max_new,
                 **(extra or {}))
  with open(os.path.join(out_dir, RESULTS_FILE), "w") as f:
    json.dump(results, f, indent=2)
  return results


def run(checkpoint: str, benchmark: str, data: str, out_dir: str, *, limit: int | None = None,
        batch_size: int = 8, progress: bool = True, quantize: str = "none", matmul_dtype: str = "float32") -> dict:
  """launch/eval.py's job: load a model folder (weight-quantized with `quantize`: none, int8, int4; the
  prompts' matmuls with `matmul_dtype` operands), read the benchmark, evaluate, write results."""
  from tinyvlm_jax.generate import VLMGenerator
  from tinyvlm_jax.serving import find_model_dir, load_for_inference, load_model_tokenizer
  model_dir = find_model_dir(checkpoint)
  config, params = load_for_inference(model_dir, quantize, matmul_dtype)
  tokenizer = load_model_tokenizer(model_dir)
  items = read_benchmark(benchmark, data, limit=limit)
  generator = VLMGenerator(config, params, stop_ids=tokenizer.stop_ids, pad_id=tokenizer.pad_id)
  return evaluate(generator, config, tokenizer, items, benchmark=benchmark, out_dir=out_dir,
                  batch_size=batch_size, progress=progress,
                  extra=dict(checkpoint=model_dir, data=os.path.abspath(data), quantize=quantize,
                             matmul_dtype=matmul_dtype))
