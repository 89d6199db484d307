"""Evaluate a checkpoint on a benchmark (EVAL.md): VQAv2, TextVQA, POPE, MMMU or RealWorldQA.

  python launch/eval.py --checkpoint DIR --benchmark vqav2|textvqa|pope|mmmu|realworldqa --data PATH
      [--limit N] [--batch-size 8] --out DIR [--no-progress] [--quantize none|int8|int4]
      [--matmul-dtype float32|bfloat16]

--data: the benchmark's parquet file (or a folder of parquet shards) in the layout EVAL.md lists, or a
JSONL file with an image path column. Writes OUT/results.json and OUT/predictions.jsonl; rerunning
with the same --out resumes, skipping the ids already predicted.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tinyvlm_jax.eval.benchmarks import BENCHMARKS  # noqa: E402


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--checkpoint", required=True, help="model folder, or a training workdir (newest model in it)")
  p.add_argument("--benchmark", required=True, choices=BENCHMARKS, help="which benchmark's prompts and metric")
  p.add_argument("--data", required=True, help="parquet file/folder or JSONL of the benchmark")
  p.add_argument("--limit", type=int, default=None, help="evaluate the first N items only")
  p.add_argument("--batch-size", type=int, default=8, help="prompts generated together (default 8)")
  p.add_argument("--out", required=True, help="output folder for results.json and predictions.jsonl")
  p.add_argument("--no-progress", action="store_true", help="no progress bar")
  p.add_argument("--quantize", default="none", metavar="MODE",
                 help="weight-only quantization of the LLM, vision tower, CNN and heads: none (default), int8, int4 "
                      "(group 128), int4_g64, int4_g32")
  p.add_argument("--matmul-dtype", default="float32", choices=("float32", "bfloat16"),
                 help="operands of the vision tower's and the prompts' matmuls (sums stay float32; decode steps "
                      "stay float32): float32 (default) or bfloat16, faster on CPUs with AVX512-BF16")
  args = p.parse_args(argv)
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
  from tinyvlm_jax.cpu_runtime import keep_freed_memory
  from tinyvlm_jax.eval.runner import run
  keep_freed_memory()  # CPU: freed buffers stay mapped instead of page-faulting back at every batch
  try:
    results = run(args.checkpoint, args.benchmark, args.data, args.out, limit=args.limit,
                  batch_size=args.batch_size, progress=not args.no_progress, quantize=args.quantize,
                  matmul_dtype=args.matmul_dtype)
  except (FileNotFoundError, ValueError, KeyError) as e:  # a user's path or file: one line, exit 2
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(json.dumps(results))
  return 0


if __name__ == "__main__":
  sys.exit(main())
