"""A TinyVLM model folder -> a PyTorch export (safetensors, config.json, tokenizer files).

  python convert/jax_to_torch.py --checkpoint DIR --out DIR [--dtype float32|bfloat16]

Backbones keep transformers' names under `vision_model.`, `language_model.` and `cnn.` (each
loads alone into SiglipVisionModel, Qwen2ForCausalLM, ConvNextV2Model); the heads sit under
`pooler.`, `connector.`, `fuser.`. `tinyvlm_jax.torch_model.TinyVLMTorch.from_pretrained(OUT)`
serves it.
"""

import argparse
import os
import sys
import time

from tinyvlm_jax import model_io
from tinyvlm_jax.convert import tinyvlm as convert
from tinyvlm_jax.convert.mapping import CheckpointMismatchError


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--checkpoint", required=True, help="model folder (config.json + params/)")
  parser.add_argument("--out", required=True, help="export folder to write")
  parser.add_argument("--dtype", default="float32", choices=convert.DTYPES)
  parser.add_argument("--max-shard-gb", type=float, default=convert.DEFAULT_MAX_SHARD_BYTES / 1024 ** 3,
                      help="shard the safetensors above this size, with model.safetensors.index.json")
  args = parser.parse_args(argv)
  start = time.time()
  try:
    if os.path.exists(os.path.join(args.out, "config.json")):
      raise model_io.ModelFolderError(f"{args.out}: already holds an export (config.json); choose a new folder")
    config, params = model_io.load_model(args.checkpoint)
    files = convert.save_export(args.out, params, config, dtype=args.dtype,
                                max_shard_bytes=int(args.max_shard_gb * 1024 ** 3),
                                tokenizer_src=args.checkpoint, consume=True)
  except (CheckpointMismatchError, model_io.ModelFolderError) as e:
    print(f"jax_to_torch: error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {args.out}: {len(files)} safetensors file(s), {args.dtype}, {time.time() - start:.1f} s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
