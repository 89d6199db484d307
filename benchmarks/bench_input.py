"""Input-pipeline throughput: decode + 5 SigLIP views + CNN view + tokenize, by number of workers.

  python benchmarks/bench_input.py [--preset tinyvlm_0p6b] [--workers 0,1,2] [--read-threads 1]
      [--samples 96] [--batch-size 8] [--max-len 1024]

The corpus is the real photos that ship in the scikit-image wheel (PNG and JPEG, 300-600 px),
written as a LLaVA JSON with two questions per image and repeated to `--samples` records. For
each worker count the grain pipeline (tinyvlm_jax.data.pipeline, the one training uses) runs
over the corpus with the preset's image sizes (384 px views of a 768 px zoom, 224 px CNN view
for tinyvlm_0p6b) and the offline Qwen2.5 tokenizer. The first batch (worker start-up) is not
timed; samples/s is over the rest. Last line: one JSON object.
"""

import argparse
import json
import os
import shutil
import tempfile
import time

import numpy as np
import skimage

from tinyvlm_jax.data import readers
from tinyvlm_jax.data.pipeline import Pipeline, PipelineConfig
from tinyvlm_jax.presets import model_config

PHOTOS = ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "camera.png", "motorcycle_left.png")
QUESTIONS = ("What is in the image?", "Describe the picture in one sentence.")


def write_corpus(root: str, n: int) -> str:
  """`n` LLaVA records over the scikit-image photos; returns the JSON path."""
  photo_dir = os.path.join(os.path.dirname(skimage.__file__), "data")
  rows = []
  for i in range(n):
    name = PHOTOS[i % len(PHOTOS)]
    rows.append({"id": f"photo-{i:05d}", "image": os.path.join(photo_dir, name),
                 "conversations": [{"from": "human", "value": "<image>\n" + QUESTIONS[i % 2]},
                                   {"from": "gpt", "value": f"A photo from scikit-image, {name}."}]})
  path = os.path.join(root, "corpus.json")
  with open(path, "w") as f:
    json.dump(rows, f)
  return path


def measure(source, model_cfg, *, workers: int, read_threads: int, batch_size: int, max_len: int, samples: int) -> dict:
  config = PipelineConfig(batch_size=batch_size, max_len=max_len, seed=0, num_epochs=1, worker_count=workers,
                          read_threads=read_threads,
                          text_every=0, math_every=0, drop_remainder=True, max_bad_fraction=0.0)
  with Pipeline(source, model_cfg=model_cfg, config=config, process_index=0, process_count=1) as pipe:
    start = time.perf_counter()
    next(pipe)  # worker start-up and the first batch: not timed
    first = time.perf_counter() - start
    start, timed = time.perf_counter(), 0
    for batch in pipe:
      timed += batch["input_ids"].shape[0]
    seconds = time.perf_counter() - start
    bad = pipe.stats()
  if timed == 0:
    raise SystemExit(f"--samples {samples} leaves no batch after the first; give more samples")
  return {"workers": workers, "read_threads": read_threads, "samples": timed, "seconds": round(seconds, 2),
          "samples_per_s": round(timed / seconds, 2), "first_batch_s": round(first, 2), "stats": bad}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--preset", default="tinyvlm_0p6b", help="model preset that sets the image sizes")
  parser.add_argument("--workers", default="0,1,2", help="comma-separated grain worker counts to compare")
  parser.add_argument("--read-threads", type=int, default=0,
                      help="grain read threads per process (the pipeline's default is 1; 0 runs the transform in "
                           "the main thread when there are no workers)")
  parser.add_argument("--samples", type=int, default=96, help="records in the corpus (one epoch per run)")
  parser.add_argument("--batch-size", type=int, default=8, help="samples per batch")
  parser.add_argument("--max-len", type=int, default=1024, help="padded sequence length")
  args = parser.parse_args()
  try:
    workers = [int(w) for w in args.workers.split(",")]
  except ValueError:
    raise SystemExit(f"--workers must be comma-separated integers, got {args.workers!r}") from None
  model_cfg = model_config(args.preset)
  root = tempfile.mkdtemp(prefix="bench_input_")
  try:
    source = readers.llava_json(write_corpus(root, args.samples), name="photos")
    runs = []
    for w in workers:
      run = measure(source, model_cfg, workers=w, read_threads=args.read_threads, batch_size=args.batch_size, max_len=args.max_len,
                    samples=args.samples)
      print(f"workers={w}: {run['samples_per_s']} samples/s ({run['samples']} samples in {run['seconds']} s; "
            f"first batch {run['first_batch_s']} s)", flush=True)
      runs.append(run)
  finally:
    shutil.rmtree(root, ignore_errors=True)
  rates = [r["samples_per_s"] for r in runs]
  print(json.dumps({
      "preset": args.preset, "cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2),
      "views": model_cfg.num_views, "view_px": model_cfg.vision.image_size, "cnn_px": model_cfg.cnn.image_size,
      "read_threads": args.read_threads, "batch_size": args.batch_size, "max_len": args.max_len, "runs": runs,
      "rising_with_workers": bool(np.all(np.diff(rates) > 0))}))


if __name__ == "__main__":
  main()
