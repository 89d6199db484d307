"""Full-size parity: random transformers SigLIP-B/16-384, Qwen2.5-0.5B and ConvNeXt-V2-Tiny vs our Flax
modules after conversion, fp32 on CPU. Prints one line per tower, then one JSON object.

  python benchmarks/parity_full_size.py [--seq-len 64] [--images 1]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from tinyvlm_jax.convert import convnext as convnext_convert  # noqa: E402
from tinyvlm_jax.convert import qwen2 as qwen_convert  # noqa: E402
from tinyvlm_jax.convert import siglip as siglip_convert  # noqa: E402
from tinyvlm_jax.models.convnext import ConvNextV2  # noqa: E402
from tinyvlm_jax.models.qwen2 import Qwen2ForCausalLM  # noqa: E402
from tinyvlm_jax.models.siglip import SiglipVisionTower  # noqa: E402
from tinyvlm_jax.presets import model_config  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def peak_rss_gb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux -> GB


def run_siglip(cfg, images: int, rng):
  from transformers import SiglipVisionModel
  hf = SiglipVisionModel(siglip_convert.to_hf_config(cfg)).eval()
  params = siglip_convert.params_from_hf(hf, cfg)
  x = rng.uniform(-1, 1, (images, cfg.image_size, cfg.image_size, 3)).astype(np.float32)
  with torch.no_grad():
    want = hf(pixel_values=torch.from_numpy(x.transpose(0, 3, 1, 2)), output_hidden_states=True)
  start = time.perf_counter()
  last, hidden = jax.jit(SiglipVisionTower(cfg).apply)({"params": params}, x)
  last.block_until_ready()
  seconds = time.perf_counter() - start
  diffs = [np.abs(np.asarray(a) - b.numpy()).max() for a, b in zip(hidden, want.hidden_states)]
  diffs.append(np.abs(np.asarray(last) - want.last_hidden_state.numpy()).max())
  return float(max(diffs)), seconds, float(np.abs(want.last_hidden_state.numpy()).max())


def run_qwen(cfg, seq_len: int, rng):
  from transformers import Qwen2ForCausalLM as HFQwen
  hf = HFQwen(qwen_convert.to_hf_config(cfg)).eval()
  params = qwen_convert.params_from_hf(hf, cfg)
  ids = rng.integers(0, cfg.vocab_size, (1, seq_len))
  with torch.no_grad():
    want = hf(input_ids=torch.from_numpy(ids)).logits.numpy()
  start = time.perf_counter()
  positions = np.arange(seq_len, dtype=np.int32)[None]
  logits, _ = jax.jit(Qwen2ForCausalLM(cfg).apply)({"params": params}, ids.astype(np.int32), positions=positions,
                                                  attention_mask=np.ones_like(positions))
  logits.block_until_ready()
  seconds = time.perf_counter() - start
  return float(np.abs(np.asarray(logits) - want).max()), seconds, float(np.abs(want).max())


def run_convnext(cfg, images: int, rng):
  from transformers import ConvNextV2Model
  hf = ConvNextV2Model(convnext_convert.to_hf_config(cfg)).eval()
  with torch.no_grad():  # transformers inits GRN to zero: make it matter
    for name, p in hf.named_parameters():
      if "grn" in name:
        p.normal_(0.0, 0.2)
  params = convnext_convert.params_from_hf(hf, cfg)
  x = rng.normal(size=(images, cfg.image_size, cfg.image_size, 3)).astype(np.float32)
  with torch.no_grad():
    want = hf(pixel_values=torch.from_numpy(x.transpose(0, 3, 1, 2))).last_hidden_state.numpy()
  start = time.perf_counter()
  out = jax.jit(ConvNextV2(cfg).apply)({"params": params}, x)
  out.block_until_ready()
  seconds = time.perf_counter() - start
  return float(np.abs(np.asarray(out) - want.transpose(0, 2, 3, 1)).max()), seconds, float(np.abs(want).max())


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--preset", default="tinyvlm_0p6b", help="model preset whose towers are compared")
  parser.add_argument("--seq-len", type=int, default=64, help="tokens in the Qwen2 comparison")
  parser.add_argument("--images", type=int, default=1, help="images in the SigLIP and ConvNeXt comparisons")
  parser.add_argument("--tolerance", type=float, default=1e-4, help="max abs diff that counts as parity")
  args = parser.parse_args()
  torch.manual_seed(0)
  torch.set_num_threads(os.cpu_count() or 1)
  rng = np.random.default_rng(0)
  cfg = model_config(args.preset)
  results = {"preset": args.preset, "tolerance": args.tolerance}
  for name, fn, sub, arg in (("siglip", run_siglip, cfg.vision, args.images),
                             ("qwen2", run_qwen, cfg.llm, args.seq_len),
                             ("convnext_v2", run_convnext, cfg.cnn, args.images)):
    start = time.perf_counter()
    diff, jax_seconds, scale = fn(sub, arg, rng)
    results[name] = dict(max_abs_diff=diff, output_abs_max=scale, jax_forward_seconds_incl_compile=round(jax_seconds, 2),
                         total_seconds=round(time.perf_counter() - start, 2), peak_rss_gb=round(peak_rss_gb(), 2),
                         ok=diff <= args.tolerance)
    print(f"{name}: max abs diff {diff:.3e} (outputs up to {scale:.2f}), "
          f"{results[name]['total_seconds']} s, peak RSS {results[name]['peak_rss_gb']} GB", flush=True)
    gc.collect()
  results["all_ok"] = all(results[k]["ok"] for k in ("siglip", "qwen2", "convnext_v2"))
  print(json.dumps(results))


if __name__ == "__main__":
  main()
