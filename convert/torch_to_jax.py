"""A PyTorch TinyVLM export (from convert/jax_to_torch.py) -> a TinyVLM model folder.

  python convert/torch_to_jax.py --input DIR --out DIR

Strict: a missing, unexpected or wrongly shaped key stops with its name and both shapes.
fp32 exports round-trip bit-exactly; bf16 ones are widened to fp32.
"""

import argparse
import sys
import time

from tinyvlm_jax import model_io
from tinyvlm_jax.convert import tinyvlm as convert
from tinyvlm_jax.convert.mapping import CheckpointMismatchError


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--input", required=True, help="export folder (config.json + safetensors)")
  parser.add_argument("--out", required=True, help="model folder to write")
  parser.add_argument("--overwrite", action="store_true", help="replace an existing model folder")
  args = parser.parse_args(argv)
  start = time.time()
  try:
    config, params = convert.load_export(args.input)
    tokenizer = args.input if model_io.tokenizer_files(args.input) else None
    out = model_io.save_model(args.out, params, config, tokenizer_src=tokenizer, overwrite=args.overwrite)
  except (CheckpointMismatchError, model_io.ModelFolderError) as e:
    print(f"torch_to_jax: error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {out}, {time.time() - start:.1f} s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
