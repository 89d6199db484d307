"""Generation speed on CPU: JAX (float32, int8, int4) against the PyTorch TinyVLM (float32, bfloat16).

  python benchmarks/bench_generate.py [--preset tinyvlm_0p6b] [--checkpoint DIR]
      [--quantize none,int8,int4,none+bf16,int8+bf16] [--torch-dtypes float32,bfloat16] [--new-tokens 64]
      [--question-tokens 32] [--repeats 3] [--threads N] [--batch 1]

One image (5 SigLIP views + the CNN view) and a question of exactly --question-tokens tokens in
the ChatML prompt, greedy, batch 1 (the issue's setting) or --batch copies of it (a batched decode,
as `launch/eval.py` runs 8 prompts at a time). Stop ids are switched off, so every run generates exactly
--new-tokens tokens whatever the weights. Without --checkpoint the weights are random (normal,
std 0.02; norms 1, biases 0), written once as a PyTorch export that both backends load, so they
run the same numbers. Each backend and variant runs in its own process (separate RSS peaks, no
thread pools fighting), one warm-up generation (JAX compiles) then --repeats timed ones; the
median is reported:

  vision_s   the image encoder (SigLIP on 5 views, pooler, connector, CNN, fuser)
  ttft_s     prompt in -> first new token (vision + embedding + prefill + first token)
  decode_tps new tokens after the first (over all rows of the batch) / seconds after the first
  rss_gb     peak RSS during the timed generations; rss_peak_gb over the process's life (loading)

  bw_gbs     memory read bandwidth just before the run (XLA float32 GEMV over 1 GiB), and
  bw_frac    decode_tps / batch x the LLM weight bytes read per step / bw_gbs (1.0 = at the bandwidth limit)

Settings: both backends run with glibc keeping freed memory mapped and its heap on huge pages
(`MALLOC_ENV` of tinyvlm_jax.cpu_runtime; otherwise every call page-faults its buffers in again,
which in this VM made large elementwise ops 15x slower, and the weight stream misses the TLB).
torch uses --threads intra-op threads (default: all
cores); JAX uses XLA's defaults (no XLA_FLAGS). The machine is shared: the load average before
each run is printed and kept in the JSON.

JAX variants (--quantize): a weight mode (none, int8, int4, int4_g64, int4_g32), optionally with
"+bf16": the vision tower's and the prompt's matmuls take bfloat16 operands with float32 sums
(`--matmul-dtype bfloat16` of launch/generate.py; decode steps stay float32).

Accuracy (--agreement, on by default): teacher-forced next-token argmax agreement of each quantized
or bf16-matmul variant with float32, and the max / mean |logit difference|, over 8 sequences of 64
tokens, (a) on the full-size LLM with the benchmark's random weights (flat logits: the worst case)
and (b) on a small Qwen2 (4 layers, width 256) trained here for a few hundred steps on a synthetic
order-2 Markov language, whose predictions are peaked like a trained model's.

Last line: one JSON object with every run, the JAX/PyTorch ratios and the agreement figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from tinyvlm_jax.cpu_runtime import PeakRss, lifetime_peak_rss  # pylint: disable=g-import-not-at-top,wrong-import-position



# ---------------------------------------------------------------------------------------
# Inputs and weights (parent process).

def make_inputs(config, question_tokens: int, seed: int = 0) -> dict:
  """Prompt ids holding the image placeholders and a question of exactly `question_tokens` tokens,
  plus the views of one synthetic 640x480 image."""
  from PIL import Image
  from tinyvlm_jax.data.chat import encode_prompt
  from tinyvlm_jax.data.images import preprocess
  from tinyvlm_jax.data.tokenizer import load_tokenizer
  tok = load_tokenizer()
  kw = dict(num_image_tokens=config.num_visual_tokens, image_token_id=config.image_token_id)
  base = len(encode_prompt("", tok, **kw))
  words = ("What colour is the large object near the left edge of the picture, and how many smaller "
           "shapes can you count around it in total, including the ones that are partly hidden behind "
           "the tree and the two boxes at the bottom right corner of the scene?").split()
  ids = None
  for n in range(1, len(words) + 1):
    ids = encode_prompt(" ".join(words[:n]), tok, **kw)
    if len(ids) - base >= question_tokens:
      break
  if len(ids) - base != question_tokens:
    raise SystemExit(f"could not make a question of exactly {question_tokens} tokens (got {len(ids) - base})")
  if int(ids.max()) >= config.llm.vocab_size:
    raise SystemExit(f"the prompt's Qwen2.5 token ids go up to {int(ids.max())}, beyond this preset's LLM "
                     f"vocab_size {config.llm.vocab_size}: use a preset with the Qwen2.5 vocabulary "
                     f"(tinyvlm_0p6b, demo)")
  rng = np.random.default_rng(seed)
  image = Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8))
  views = preprocess(image, config)
  return {"input_ids": ids[None].astype(np.int32), "pixel_values": views["pixel_values"][None],
          "cnn_pixel_values": views["cnn_pixel_values"][None]}


def random_params(config, seed: int = 0) -> dict:
  """Random full-size params without jax.random (numpy: seconds instead of minutes on 2 cores)."""
  import jax
  from tinyvlm_jax.models.tinyvlm import param_shapes
  rng = np.random.default_rng(seed)

  def leaf(path, s):
    name = str(getattr(path[-1], "key", path[-1]))
    if name == "bias":
      return np.zeros(s.shape, np.float32)
    if name == "scale":
      return np.ones(s.shape, np.float32)
    return rng.standard_normal(s.shape, np.float32) * np.float32(0.02)
  return jax.tree_util.tree_map_with_path(leaf, param_shapes(config))


# ---------------------------------------------------------------------------------------
# Child processes: one backend and variant each; print one JSON line.

def median_runs(runs: list[dict]) -> dict:
  return {k: float(np.median([r[k] for r in runs])) for k in runs[0]}


def jax_variant(variant: str) -> tuple[str, str]:
  """'MODE' or 'MODE+bf16' -> (weight mode, matmul dtype)."""
  from tinyvlm_jax.quantize import parse_mode
  mode, _, suffix = variant.partition("+")
  if suffix not in ("", "bf16"):
    raise SystemExit(f"JAX variant {variant!r}: expected MODE or MODE+bf16 (MODE: none, int8, int4, int4_g64, int4_g32)")
  try:
    parse_mode(mode)
  except ValueError as e:
    raise SystemExit(f"JAX variant {variant!r}: {e}") from None
  return mode, "bfloat16" if suffix else "float32"


def child_jax(args, inputs) -> dict:
  import jax
  from tinyvlm_jax.generate import VLMGenerator
  from tinyvlm_jax.quantize import quantize_params, quantized_config, weight_bytes
  from tinyvlm_jax.serving import with_matmul_dtype
  if args.checkpoint:
    from tinyvlm_jax.model_io import load_model
    config, params = load_model(args.checkpoint)
  else:
    from tinyvlm_jax.convert.tinyvlm import load_export
    config, params = load_export(args.export)
  mode, matmul_dtype = jax_variant(args.variant)
  start = time.perf_counter()
  params = quantize_params(params, config, mode)
  config = with_matmul_dtype(quantized_config(config, mode), matmul_dtype)
  quantize_s = time.perf_counter() - start
  params = jax.device_put(params)
  towers = {name: weight_bytes(tree) for name, tree in params.items()}
  gen = VLMGenerator(config, params, stop_ids=(), pad_id=0)
  ids = inputs["input_ids"][0].tolist()
  pixels = np.repeat(inputs["pixel_values"], args.batch, axis=0)
  cnn = np.repeat(inputs["cnn_pixel_values"], args.batch, axis=0) if config.use_cnn else None

  def once() -> dict:
    gen.stats = type(gen.stats)()
    rows = gen.generate([ids] * args.batch, pixels, cnn, max_new_tokens=args.new_tokens)
    if any(len(r) != args.new_tokens for r in rows):
      raise SystemExit(f"jax generated {[len(r) for r in rows]} tokens, expected {args.new_tokens} per row")
    tokens = rows[0]
    s = gen.stats
    return {"vision_s": s.vision_seconds, "ttft_s": s.ttft_seconds[-1], "decode_tps": s.decode_tokens_per_second}, tokens

  start = time.perf_counter()
  once()
  warmup_s = time.perf_counter() - start
  with PeakRss() as rss:
    runs = [once() for _ in range(args.repeats)]
  return dict(median_runs([r for r, _ in runs]), rss_gb=rss.peak / 1e9, rss_peak_gb=lifetime_peak_rss() / 1e9,
              weight_bytes=sum(towers.values()), weight_bytes_by_part=towers, llm_bytes=towers["llm"],
              quantize_s=quantize_s, warmup_s=warmup_s, tokens=runs[-1][1][:16])


def child_torch(args, inputs) -> dict:
  import torch
  import transformers
  from transformers.generation.streamers import BaseStreamer
  from tinyvlm_jax.torch_model import TinyVLMTorch
  torch.set_num_threads(args.threads)
  dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.variant]
  model = TinyVLMTorch.from_pretrained(args.export, dtype=dtype)
  ids = torch.from_numpy(np.repeat(inputs["input_ids"], args.batch, axis=0)).long()
  pixels = np.repeat(inputs["pixel_values"], args.batch, axis=0)
  cnn = np.repeat(inputs["cnn_pixel_values"], args.batch, axis=0) if model.config.use_cnn else None
  gen_config = transformers.GenerationConfig(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                             do_sample=False, eos_token_id=None, pad_token_id=0, bos_token_id=None)

  class FirstToken(BaseStreamer):
    def __init__(self):
      self.first = None

    def put(self, value):
      if self.first is None and value.numel():
        self.first = time.perf_counter()

    def end(self):
      pass

  @torch.no_grad()
  def once():
    start = time.perf_counter()
    model.encode_images(pixels, cnn)
    vision_s = time.perf_counter() - start
    streamer = FirstToken()
    start = time.perf_counter()
    embeds = model.embed_inputs(ids, pixels, cnn)
    out = model.language_model.generate(inputs_embeds=embeds, attention_mask=torch.ones(ids.shape, dtype=torch.long),
                                        generation_config=gen_config, streamer=streamer)
    end = time.perf_counter()
    if out.shape[1] != args.new_tokens:
      raise SystemExit(f"torch generated {out.shape[1]} tokens, expected {args.new_tokens}")
    ttft = streamer.first - start
    decode_tps = (args.new_tokens - 1) * args.batch / (end - streamer.first)
    return {"vision_s": vision_s, "ttft_s": ttft, "decode_tps": decode_tps}, out[0].tolist()

  start = time.perf_counter()
  once()
  warmup_s = time.perf_counter() - start
  with PeakRss() as rss:
    runs = [once() for _ in range(args.repeats)]
  nbytes = lambda m: sum(p.numel() * p.element_size() for p in m.parameters())
  return dict(median_runs([r for r, _ in runs]), rss_gb=rss.peak / 1e9, rss_peak_gb=lifetime_peak_rss() / 1e9,
              weight_bytes=nbytes(model), llm_bytes=nbytes(model.language_model), warmup_s=warmup_s,
              tokens=runs[-1][1][:16], threads=torch.get_num_threads())


# ---------------------------------------------------------------------------------------
# Parent.

def run_child(args, backend: str, variant: str, export: str, inputs_path: str) -> dict:
  """Runs one backend and variant in a fresh process; its last stdout line is the result JSON."""
  cmd = [sys.executable, os.path.abspath(__file__), "--child", backend, "--variant", variant, "--export", export,
         "--inputs", inputs_path, "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats),
         "--threads", str(args.threads), "--train-steps", str(args.train_steps), "--batch", str(args.batch)]
  if args.checkpoint:
    cmd += ["--checkpoint", args.checkpoint]
  from tinyvlm_jax.cpu_runtime import MALLOC_ENV
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu",
             **MALLOC_ENV)
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
  if proc.returncode != 0:
    raise SystemExit(f"{backend} {variant} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def load_average() -> list[float]:
  return [round(x, 2) for x in os.getloadavg()]


def read_bandwidth_gbs(gib: int = 1, repeats: int = 5) -> float:
  """Memory read bandwidth now: best of `repeats` XLA float32 GEMVs over a `gib` GiB matrix."""
  import jax
  import jax.numpy as jnp
  w = jnp.ones((gib * 2**18, 1024), jnp.float32)
  x = jnp.ones((1024,), jnp.float32)
  gemv = jax.jit(lambda w, x: w @ x)
  gemv(w, x).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    gemv(w, x).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return w.nbytes / best / 1e9


# ---------------------------------------------------------------------------------------
# Quantization accuracy (child process).

AGREEMENT_SEQUENCES, AGREEMENT_TOKENS = 8, 64


def logit_agreement(cfg, params, tokens: np.ndarray, variants) -> dict:
  """Teacher-forced logits of the float32 LLM and of each JAX variant (jax_variant) on the same tokens."""
  import jax
  import jax.numpy as jnp
  from tinyvlm_jax.models.qwen2 import Qwen2ForCausalLM
  from tinyvlm_jax.quantize import quantize_params, quantized_config, weight_bytes
  ids = jnp.asarray(tokens, jnp.int32)
  kw = dict(positions=jnp.broadcast_to(jnp.arange(ids.shape[1], dtype=jnp.int32), ids.shape),
            attention_mask=jnp.ones_like(ids))

  def logits(cfg, params):
    return jax.jit(lambda p: Qwen2ForCausalLM(cfg).apply({"params": p}, ids, **kw)[0])(params)

  ref = logits(cfg, params)
  top2 = jax.lax.top_k(ref, 2)[0]
  out = {"positions": int(ids.size), "fp32_logit_std": float(ref.std()),
         "fp32_top1_prob_mean": float(jnp.mean(jnp.max(jax.nn.softmax(ref, -1), -1))),
         "fp32_top1_margin_median": float(jnp.median(top2[..., 0] - top2[..., 1])),
         "fp32_weight_bytes": weight_bytes(params)}
  for variant in variants:
    mode, matmul_dtype = jax_variant(variant)
    got = logits(dataclasses.replace(quantized_config(cfg, mode), matmul_dtype=matmul_dtype),
                 quantize_params(params, cfg, mode))
    diff = jnp.abs(got - ref)
    out[variant] = {"top1_agreement": float(jnp.mean(jnp.argmax(got, -1) == jnp.argmax(ref, -1))),
                 "max_abs_logit_diff": float(diff.max()), "mean_abs_logit_diff": float(diff.mean()),
                 "weight_bytes": weight_bytes(quantize_params(params, cfg, mode))}
  return out


def markov_sequences(rng, n: int, length: int, vocab: int, table_seed: int = 0) -> np.ndarray:
  """A synthetic language: the next token is succ1[previous] (p 0.75), succ2[the one before] (p 0.2),
  or uniform (p 0.05); the tables are fixed by `table_seed`."""
  tables = np.random.default_rng(table_seed)
  succ1, succ2 = tables.integers(0, vocab, vocab), tables.integers(0, vocab, vocab)
  seq = np.zeros((n, length), np.int64)
  seq[:, :2] = rng.integers(0, vocab, (n, 2))
  for t in range(2, length):
    r = rng.random(n)
    seq[:, t] = np.where(r < 0.75, succ1[seq[:, t - 1]],
                         np.where(r < 0.95, succ2[seq[:, t - 2]], rng.integers(0, vocab, n)))
  return seq


def trained_small_lm(steps: int, seed: int = 0):
  """A 4-layer Qwen2 (width 256, vocab 2048) trained on `markov_sequences`: peaked predictions."""
  import jax
  import jax.numpy as jnp
  import optax
  from tinyvlm_jax.models.config import QwenConfig
  from tinyvlm_jax.models.qwen2 import Qwen2ForCausalLM
  cfg = QwenConfig(vocab_size=2048, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rope_theta=10000.0)
  model = Qwen2ForCausalLM(cfg)
  rng = np.random.default_rng(seed)
  batch, length = 16, 64
  pos = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
  kw = dict(positions=pos, attention_mask=jnp.ones((batch, length), jnp.int32))
  params = model.init(jax.random.key(seed), jnp.zeros((batch, length), jnp.int32), **kw)["params"]
  opt = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, 3e-3, min(20, steps // 2), steps), weight_decay=0.01)
  state = opt.init(params)

  @jax.jit
  def step(params, state, ids):
    def loss_fn(p):
      logits = model.apply({"params": p}, ids, **kw)[0]
      return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  losses = []
  for _ in range(steps):
    ids = jnp.asarray(markov_sequences(rng, batch, length, cfg.vocab_size), jnp.int32)
    params, state, loss = step(params, state, ids)
    losses.append(float(loss))
  return cfg, params, losses


def child_agreement(args, inputs) -> dict:
  from tinyvlm_jax.convert.tinyvlm import load_export
  modes = [m for m in args.variant.split(",") if m != "none"]
  if args.checkpoint:
    from tinyvlm_jax.model_io import load_model
    config, params = load_model(args.checkpoint)
  else:
    config, params = load_export(args.export)
  llm = params["llm"]
  del params
  rng = np.random.default_rng(1)
  tokens = rng.integers(0, config.llm.vocab_size, (AGREEMENT_SEQUENCES, AGREEMENT_TOKENS))
  out = {"full_size_llm": logit_agreement(config.llm, llm, tokens, modes)}
  del llm
  start = time.perf_counter()
  cfg, small, losses = trained_small_lm(args.train_steps)
  tokens = markov_sequences(np.random.default_rng(2), AGREEMENT_SEQUENCES, AGREEMENT_TOKENS, cfg.vocab_size)
  out["trained_small_llm"] = dict(logit_agreement(cfg, small, tokens, modes), train_steps=args.train_steps,
                                  loss_first=losses[0], loss_last=float(np.mean(losses[-10:])),
                                  train_s=time.perf_counter() - start)
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--preset", default="tinyvlm_0p6b")
  p.add_argument("--checkpoint", help="a JAX model folder (default: random weights)")
  p.add_argument("--quantize", default="none,int8,int4,none+bf16,int8+bf16",
                 help="JAX variants, comma-separated: a weight mode, +bf16 for bfloat16 prompt matmuls "
                      "(default: none,int8,int4,none+bf16,int8+bf16)")
  p.add_argument("--torch-dtypes", default="float32,bfloat16", help="PyTorch variants ('' for none)")
  p.add_argument("--new-tokens", type=int, default=64)
  p.add_argument("--question-tokens", type=int, default=32)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads (default: all cores)")
  p.add_argument("--batch", type=int, default=1, help="copies of the prompt decoded together (default: 1)")
  p.add_argument("--no-agreement", dest="agreement", action="store_false",
                 help="skip the quantization accuracy measurement")
  p.add_argument("--train-steps", type=int, default=300, help="training steps of the small LLM for --agreement")
  p.add_argument("--child", choices=("jax", "torch", "agreement"), help=argparse.SUPPRESS)
  p.add_argument("--variant", help=argparse.SUPPRESS)
  p.add_argument("--export", help=argparse.SUPPRESS)
  p.add_argument("--inputs", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.batch < 1:
    p.error(f"--batch must be at least 1, got {args.batch}")
  if args.train_steps < 1:
    p.error(f"--train-steps must be at least 1, got {args.train_steps}")

  if args.child:
    inputs = dict(np.load(args.inputs))
    result = {"jax": child_jax, "torch": child_torch, "agreement": child_agreement}[args.child](args, inputs)
    print(json.dumps(result))
    return

  from tinyvlm_jax.presets import model_config
  from tinyvlm_jax.convert.tinyvlm import save_export
  jax_modes = [v for v in args.quantize.split(",") if v]
  for v in jax_modes:
    jax_variant(v)  # a bad variant fails before the weights are built
  variants = [("jax", v) for v in jax_modes] + [("torch", v) for v in args.torch_dtypes.split(",") if v]
  results, agreement = {}, None
  with tempfile.TemporaryDirectory(prefix="bench_generate_") as work:
    start = time.perf_counter()
    if args.checkpoint:
      from tinyvlm_jax.model_io import load_model
      config, params = load_model(args.checkpoint)
    else:
      config = model_config(args.preset)
      params = random_params(config)
    inputs = make_inputs(config, args.question_tokens)
    inputs_path = os.path.join(work, "inputs.npz")
    np.savez(inputs_path, **inputs)
    export = os.path.join(work, "export")
    if any(b == "torch" for b, _ in variants) or not args.checkpoint:
      save_export(export, params, config, consume=True)
    del params
    print(f"weights and export ready in {time.perf_counter() - start:.1f} s; prompt {inputs['input_ids'].shape[1]} "
          f"tokens ({config.num_visual_tokens} visual, {args.question_tokens} question), {args.new_tokens} new "
          f"tokens, batch {args.batch}, stop ids off; load average {load_average()}", flush=True)
    for backend, variant in variants:
      load_before, bandwidth = load_average(), read_bandwidth_gbs()
      r = run_child(args, backend, variant, export, inputs_path)
      r.update(load_average_before=load_before, bw_gbs=round(bandwidth, 2),
               bw_frac=round(r["decode_tps"] / args.batch * r["llm_bytes"] / 1e9 / bandwidth, 3))
      results[f"{backend}_{variant}"] = r
      print(f"{backend:5s} {variant:10s}  vision {r['vision_s']:6.2f} s  TTFT {r['ttft_s']:6.2f} s  decode "
            f"{r['decode_tps']:6.2f} tok/s ({r['bw_frac']:.2f} of {bandwidth:.1f} GB/s)  RSS {r['rss_gb']:5.2f} GB "
            f"(life peak {r['rss_peak_gb']:5.2f})  weights {r['weight_bytes'] / 1e6:7.1f} MB  load {load_before}",
            flush=True)
    modes = [m for m in jax_modes if m != "none"]
    if args.agreement and modes:
      agreement = run_child(args, "agreement", ",".join(modes), export, inputs_path)
      for name, a in agreement.items():
        for m in modes:
          print(f"agreement {name:18s} {m:10s} top-1 {a[m]['top1_agreement']:.4f}  max |dlogit| "
                f"{a[m]['max_abs_logit_diff']:.4f}  mean |dlogit| {a[m]['mean_abs_logit_diff']:.5f}  "
                f"(fp32 logit std {a['fp32_logit_std']:.2f}, mean top-1 prob {a['fp32_top1_prob_mean']:.2f})")
  ratios = {}
  for jax_name in [k for k in results if k.startswith("jax_")]:
    for torch_name in [k for k in results if k.startswith("torch_")]:
      j, t = results[jax_name], results[torch_name]
      ratios[f"{jax_name}/{torch_name}"] = {
          "decode_speedup": round(j["decode_tps"] / t["decode_tps"], 3),
          "ttft_ratio": round(j["ttft_s"] / t["ttft_s"], 3),
          "vision_ratio": round(j["vision_s"] / t["vision_s"], 3)}
  for name, r in ratios.items():
    print(f"{name:28s} decode x{r['decode_speedup']:.2f}  TTFT ratio {r['ttft_ratio']:.2f}  vision ratio "
          f"{r['vision_ratio']:.2f}")
  summary = {"preset": args.preset, "checkpoint": args.checkpoint, "new_tokens": args.new_tokens,
             "question_tokens": args.question_tokens, "prompt_tokens": int(inputs["input_ids"].shape[1]),
             "repeats": args.repeats, "batch": args.batch, "cpu_count": os.cpu_count(),
             "load_average_after": load_average(),
             "date": time.strftime("%Y-%m-%d %H:%M"), "results": results, "ratios": ratios,
             "agreement": agreement}
  print(json.dumps(summary))


if __name__ == "__main__":
  main()
