"""Writes the synthetic shapes VQA set as LLaVA JSON + PNGs.

  python launch/make_synthetic_data.py --out /tmp/synth --split train --n 4096 --seed 0 [--all-questions]
"""

import argparse
import collections
import json

from tinyvlm_jax.data import synthetic


def main(argv=None) -> str:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", required=True, help="output folder (JSON file and images/)")
  parser.add_argument("--split", choices=sorted(synthetic.SPLIT_STREAMS), default="train")
  parser.add_argument("--n", type=int, default=4096, help="number of examples")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--image-size", type=int, default=64)
  parser.add_argument("--all-questions", action="store_true",
                      help="every question an image answers, as turns of one conversation (the demo's train split)")
  args = parser.parse_args(argv)
  path = synthetic.write_llava(args.out, args.split, args.n, args.seed, image_size=args.image_size,
                               all_questions=args.all_questions)
  with open(path) as f:
    types = collections.Counter(row["type"] for row in json.load(f))
  print(f"wrote {sum(types.values())} {args.split} examples to {path}: {dict(sorted(types.items()))}")
  return path


if __name__ == "__main__":
  main()
