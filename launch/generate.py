"""Answer one question about one image, streaming the answer to stdout.

  python launch/generate.py --checkpoint DIR --image PATH --prompt TEXT
      [--max-new-tokens 64] [--temperature 0] [--top-k 0] [--top-p 1.0] [--seed 0] [--backend jax|torch]
      [--quantize none|int8|int4] [--matmul-dtype float32|bfloat16]

--checkpoint: for the jax backend a model folder (launch/train.py's workdir or a folder inside it,
convert/hf_to_jax.py's output); for the torch backend an export of convert/jax_to_torch.py (no JAX
needed). --quantize: weight-only int8/int4 LLM, vision tower, CNN and heads (jax backend). --matmul-dtype
bfloat16: the vision tower's and the prompt's matmuls take bfloat16 operands, summed in float32 (jax
backend; about 1.5x faster to the first token on CPUs with AVX512-BF16). Time to first token
and decode speed go to stderr. CPU setting: glibc keeps freed memory mapped
(`tinyvlm_jax.cpu_runtime.keep_freed_memory`), so each call does not page-fault its buffers again.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--checkpoint", required=True, help="model folder (jax) or PyTorch export folder (torch)")
  p.add_argument("--image", default=None, help="image file; leave out for a text-only question")
  p.add_argument("--prompt", required=True, help="the question")
  p.add_argument("--max-new-tokens", type=int, default=64, help="token budget of the answer (default 64)")
  p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
  p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0 = off)")
  p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1.0 = off)")
  p.add_argument("--seed", type=int, default=0, help="PRNG seed for sampling")
  p.add_argument("--backend", choices=("jax", "torch"), default="jax", help="jax (default) or torch")
  p.add_argument("--quantize", default="none", metavar="MODE",
                 help="weight-only quantization of the LLM, vision tower, CNN and heads: none (default), int8, int4 "
                      "(group 128), int4_g64, int4_g32; jax backend")
  p.add_argument("--matmul-dtype", default="float32", choices=("float32", "bfloat16"),
                 help="operands of the vision tower's and the prompt's matmuls (sums stay float32; decode steps "
                      "stay float32): float32 (default) or bfloat16, faster on CPUs with AVX512-BF16; jax backend")
  return p.parse_args(argv)


class _Printer:
  """Prints the decoded answer as it grows (decoding the whole prefix keeps multi-byte characters whole)."""

  def __init__(self, tokenizer, stop_ids):
    self.tokenizer, self.stop_ids, self.shown = tokenizer, set(stop_ids), ""

  def update(self, ids) -> None:
    ids = [int(t) for t in ids]
    cut = next((i for i, t in enumerate(ids) if t in self.stop_ids), len(ids))
    text = self.tokenizer.decode(ids[:cut], skip_special=True)
    if text.startswith(self.shown) and not text.endswith("\ufffd"):
      sys.stdout.write(text[len(self.shown):])
      sys.stdout.flush()
      self.shown = text


def _inputs(args, config, tokenizer):
  import numpy as np
  from tinyvlm_jax.data.chat import encode_prompt
  from tinyvlm_jax.data.images import DEFAULT_MAX_PIXELS, load_image, preprocess
  s, c = config.vision.image_size, config.cnn.image_size
  pixels = np.zeros((1, config.num_views, s, s, 3), np.float32)
  cnn = np.zeros((1, c, c, 3), np.float32)
  if args.image:
    views = preprocess(load_image(args.image, max_pixels=DEFAULT_MAX_PIXELS), config)
    pixels, cnn = views["pixel_values"][None], views["cnn_pixel_values"][None]
  ids = encode_prompt(args.prompt, tokenizer, num_image_tokens=config.num_visual_tokens,
                      image_token_id=config.image_token_id, with_image=bool(args.image))
  return ids, pixels, cnn


def run_jax(args) -> tuple[float, int, float]:
  import jax
  from tinyvlm_jax.generate import Sampling, VLMGenerator
  from tinyvlm_jax.serving import find_model_dir, load_for_inference, load_model_tokenizer
  model_dir = find_model_dir(args.checkpoint)
  config, params = load_for_inference(model_dir, args.quantize, args.matmul_dtype)
  tokenizer = load_model_tokenizer(model_dir)
  ids, pixels, cnn = _inputs(args, config, tokenizer)
  gen = VLMGenerator(config, params, stop_ids=tokenizer.stop_ids, pad_id=tokenizer.pad_id)
  printer = _Printer(tokenizer, tokenizer.stop_ids)
  sampling = Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
  tokens = None
  start = time.perf_counter()
  for tokens in gen.stream([ids.tolist()], pixels, cnn if config.use_cnn else None,
                           max_new_tokens=args.max_new_tokens, sampling=sampling,
                           rng=jax.random.key(args.seed), chunk=1):
    printer.update(tokens[0])
  total = time.perf_counter() - start
  return gen.stats.ttft_seconds[-1], tokens.shape[1], total


def run_torch(args) -> tuple[float, int, float]:
  import torch
  from transformers.generation.streamers import BaseStreamer
  from tinyvlm_jax.data.tokenizer import load_tokenizer
  from tinyvlm_jax.torch_model import TinyVLMTorch
  model = TinyVLMTorch.from_pretrained(args.checkpoint)
  has_tok = os.path.isfile(os.path.join(args.checkpoint, "tokenizer.json"))
  tokenizer = load_tokenizer(args.checkpoint if has_tok else None)
  ids, pixels, cnn = _inputs(args, model.config, tokenizer)
  printer = _Printer(tokenizer, tokenizer.stop_ids)
  start = time.perf_counter()
  timing = {"first": None, "ids": []}

  class Streamer(BaseStreamer):
    def put(self, value):
      if timing["first"] is None:  # transformers passes the prompt first when given input_ids only
        timing["first"] = time.perf_counter()
      timing["ids"].extend(int(t) for t in value.reshape(-1).tolist())
      printer.update(timing["ids"])

    def end(self):
      pass

  model.generate(torch.from_numpy(ids[None]).long(), pixels, cnn if model.config.use_cnn else None,
                 max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                 top_p=args.top_p, stop_ids=tokenizer.stop_ids, seed=args.seed, streamer=Streamer())
  total = time.perf_counter() - start
  return timing["first"] - start, len(timing["ids"]), total


def main(argv=None) -> int:
  args = parse_args(argv)
  from tinyvlm_jax.cpu_runtime import keep_freed_memory
  from tinyvlm_jax.data.images import ImageError
  if args.backend == "torch" and (args.quantize != "none" or args.matmul_dtype != "float32"):
    print("error: --quantize and --matmul-dtype apply to the jax backend only", file=sys.stderr)
    return 2
  keep_freed_memory()
  try:
    ttft, n, total = (run_jax if args.backend == "jax" else run_torch)(args)
  except (ImageError, FileNotFoundError, ValueError) as e:  # the user's input: one line, exit 2
    print(f"error: {e}", file=sys.stderr)
    return 2
  print()
  rate = (n - 1) / (total - ttft) if n > 1 and total > ttft else 0.0
  print(f"TTFT {ttft:.3f} s, {n} tokens, decode {rate:.2f} tokens/s", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
