"""transformers checkpoint folders (SigLIP, Qwen2, ConvNeXt-V2) -> a TinyVLM model folder.

  python convert/hf_to_jax.py --siglip DIR --qwen DIR [--convnext DIR] --out DIR [--preset NAME]

Each folder's config.json must describe the preset's tower; the heads start as DESIGN.md says
(pooler = 2x2 average, connector and fuser fresh from `--seed`). The Qwen folder's tokenizer
files, when present, go to OUT/tokenizer/. The result is launch/train.py's stage-1 start.
"""

import argparse
import sys
import time

from tinyvlm_jax import model_io
from tinyvlm_jax.convert import tinyvlm as convert
from tinyvlm_jax.convert.mapping import CheckpointMismatchError
from tinyvlm_jax.models.tinyvlm import count_params
from tinyvlm_jax.presets import model_config


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--siglip", required=True, help="SigLIP checkpoint folder (SiglipVisionModel or SiglipModel)")
  parser.add_argument("--qwen", required=True, help="Qwen2 / Qwen2.5 checkpoint folder (Qwen2ForCausalLM)")
  parser.add_argument("--convnext", help="ConvNeXt-V2 checkpoint folder (needed when the preset uses the CNN)")
  parser.add_argument("--out", required=True, help="model folder to write")
  parser.add_argument("--preset", default="tinyvlm_0p6b", help="architecture preset (default: %(default)s)")
  parser.add_argument("--seed", type=int, default=0, help="seed of the fresh connector and fuser")
  parser.add_argument("--overwrite", action="store_true", help="replace an existing model folder")
  args = parser.parse_args(argv)
  start = time.time()
  try:
    config = model_config(args.preset)
  except ValueError as e:
    print(f"hf_to_jax: error: {e}", file=sys.stderr)
    return 2
  try:
    params = convert.params_from_hf_folders(config, siglip_dir=args.siglip, qwen_dir=args.qwen,
                                            convnext_dir=args.convnext, seed=args.seed,
                                            preset=f"preset {args.preset!r}")
    tokenizer = args.qwen if model_io.tokenizer_files(args.qwen) else None
    out = model_io.save_model(args.out, params, config, tokenizer_src=tokenizer, overwrite=args.overwrite)
  except (CheckpointMismatchError, model_io.ModelFolderError) as e:
    print(f"hf_to_jax: error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {out}: {count_params(params) / 1e6:.1f} M parameters (preset {args.preset}), "
        f"tokenizer {'copied' if tokenizer else 'absent'}, {time.time() - start:.1f} s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
