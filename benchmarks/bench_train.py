"""Training throughput: one stage-2 train step of TinyVLM at a given batch and sequence length.

  python benchmarks/bench_train.py [--preset tinyvlm_0p6b] [--config configs/stage2.py]
      [--batch 16] [--seq-len 1024] [--remat none,full] [--dtype auto|float32,bfloat16]
      [--steps 5] [--mesh data=-1,fsdp=1,tensor=1] [--peak-flops F]

The step is the project's own: the stage config (configs/stage2.py: vision + pooler + connector +
LLM trainable, NEFTune, its AdamW and schedule) with --preset's model, wired as
tinyvlm_jax/train/loop.py's train_stage does (train_model_config for the compute dtype and remat,
make_optimizer, param_specs and state shardings on the mesh, create_sharded_state,
make_train_step, jit_train_step), on random weights and a random batch of --batch rows of exactly
--seq-len tokens (the visual tokens of the preset included, no padding, the last quarter of the
text supervised). --remat rematerialises each Qwen2 decoder layer (QwenConfig.remat; the vision
tower is never rematerialised); --dtype is the compute dtype (params and AdamW state stay fp32;
auto = float32 on CPU, bfloat16 on GPU/TPU).

Each (remat, dtype) pair runs in its own process (its own memory peak; an out-of-memory or a
crash is recorded for that pair and the next one runs): compile, one warm-up step, then --steps
timed steps (each waited on); the median is reported:

  compile_s      lowering + XLA compile of the step
  step_s         median step time; tokens_per_s = batch x seq_len / step_s; samples_per_s
  model_tflops   train/flops.py step_flops of the step (6N + attention + LM head; remat recompute
                 not counted), mfu = model FLOPs / (step_s x devices x peak FLOP/s per device);
                 the peak is flops.py's table for accelerators, on CPU the best measured rate of
                 float32 n x n matmuls (n = 512, 1024, 2048), or --peak-flops
  memory         CPU: peak RSS over the process's life (resource.getrusage, includes building the
                 state) and during the timed steps (the kernel's high-water mark, cpu_runtime.PeakRss);
                 GPU/TPU: device.memory_stats() peak_bytes_in_use; everywhere: XLA's temp bytes of the
                 compiled step

Last stdout line: one JSON object with the machine (device kind, platform, device and CPU count,
load average, date), every configuration, and the paper's anchor: stage 2 took 77.5 A100-hours
for 169K steps of 16 samples, about 9.7 samples/s; `paper_anchor.mfu_at_this_shape` is the MFU
that rate would be on an A100 (312 TFLOP/s bf16) with this run's FLOPs per sample.

On a GPU or TPU (the issue's goal: >= 40% MFU in bf16 on one H100; NOT measured yet: this
project's machine has no GPU). `--dtype` defaults to bfloat16 there and the peak comes from
flops.py's table (H100 SXM: 989 TFLOP/s dense bf16); device memory is from memory_stats():

  python benchmarks/bench_train.py --batch 16 --seq-len 1024 --remat none,dots,full --dtype bfloat16
  python benchmarks/bench_train.py --batch 64 --seq-len 1024 --remat full --mesh data=1,fsdp=-1  # 8 GPUs

Measured here (fp32, batch 1, seq 848 = 720 visual + 128 text tokens, 2 timed steps, nothing else
running), on the two kinds of 2-core AMD EPYC VM (24 GB) this project has run on:

  Zen 5 with AVX-512 (2026-11-27 15:36, best float32 matmul 486 GFLOP/s):
  remat none: compile 12 s, step 16.0 s, 53.1 tokens/s, 0.063 samples/s, 4.38 TFLOP/step,
              275 GFLOP/s = 57% MFU; peak RSS 19.4 GB (XLA temp 9.0 GB beside the 7.0 GB fp32
              params + AdamW state)
  remat full: compile 15 s, step 19.0 s, 44.7 tokens/s, 48% MFU, peak RSS 19.1 GB (temp 8.6 GB)

  Zen 3 with AVX2 (2026-11-27 14:11, against a 512 matmul's 94.0 GFLOP/s, the peak measured then):
  remat none: compile 35 s, step 57.7 s, 14.7 tokens/s, 76 GFLOP/s = 81% MFU, peak RSS 19.3 GB
  remat full: compile 49 s, step 64.8 s, 13.1 tokens/s, 72%, peak RSS 18.9 GB

(On 2026-11-25, on the Zen 3 VM under a load average of 5.4-6.1 from other work, the same steps
took 166-169 s.)

The temp buffer is mostly parameter-sized (gradients and the clipped / AdamW intermediates, about
4 copies of the 2.3 GB of fp32 params), so remat saves little at batch 1. The paper's anchor at this
shape is 13.6% MFU on an A100.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

from tinyvlm_jax.cpu_runtime import PeakRss, lifetime_peak_rss  # pylint: disable=g-import-not-at-top,wrong-import-position

DEFAULT_CONFIG = os.path.join(REPO, "configs", "stage2.py")
MIN_TEXT_TOKENS = 3  # a row needs a few text tokens around the image (testing.random_batch)

# The paper's only training-time figure (Table 8 / sec. 4): stage 2 took 77.5 A100-hours. Its steps
# and global batch are the stage config's (169K x 16).
PAPER_STAGE2_A100_HOURS = 77.5


def load_stage_config(path: str):
  """configs/stageN.py -> its get_config(), as launch/train.py's --config would load it."""
  spec = importlib.util.spec_from_file_location("bench_stage_config", path)
  if spec is None or spec.loader is None:
    raise SystemExit(f"--config {path!r}: not a Python config file")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def parse_mesh(text: str) -> dict[str, int]:
  """'data=-1,fsdp=1,tensor=1' -> {'data': -1, 'fsdp': 1, 'tensor': 1}."""
  out = {}
  for part in filter(None, text.split(",")):
    name, sep, size = part.partition("=")
    if not sep:
      raise SystemExit(f"--mesh {text!r}: expected AXIS=SIZE pairs, e.g. data=-1,fsdp=1,tensor=1")
    out[name.strip()] = int(size)
  return out


def bench_config(args, remat: str, dtype: str):
  """The stage config with the benchmark's preset, batch, mesh, remat and compute dtype."""
  import ml_collections
  from tinyvlm_jax.presets import get_preset
  cfg = load_stage_config(args.config)
  use_cnn = cfg.model.use_cnn  # the stage decides the towers (stage 2: no CNN)
  cfg.model = get_preset(args.preset)
  cfg.model.use_cnn = use_cnn
  cfg.init.params = "random"
  cfg.global_batch_size = args.batch
  cfg.grad_accum_steps = 1
  cfg.remat = remat
  cfg.compute_dtype = dtype
  cfg.mesh = ml_collections.ConfigDict(parse_mesh(args.mesh))
  cfg.peak_flops_per_device = args.peak_flops
  return cfg


def visual_tokens(cfg) -> int:
  from tinyvlm_jax.presets import model_config
  return model_config(cfg.model).num_visual_tokens


def full_batch(model_cfg, batch: int, seq_len: int, seed: int = 0) -> dict[str, np.ndarray]:
  """testing.random_batch with every row exactly seq_len real tokens (no padding)."""
  from tinyvlm_jax.train.testing import random_batch
  text_len = seq_len - model_cfg.num_visual_tokens
  answer = max(1, text_len // 4)
  b = random_batch(model_cfg, batch, text_len, seed=seed, answer_len=answer)
  b["attention_mask"] = np.ones((batch, seq_len), np.int32)
  b["positions"] = np.tile(np.arange(seq_len, dtype=np.int32), (batch, 1))
  b["loss_mask"] = np.zeros((batch, seq_len), bool)
  b["loss_mask"][:, seq_len - answer:] = True
  return b


# ---------------------------------------------------------------------------------------
# Child process: one (remat, dtype) configuration.

def device_info() -> dict:
  import jax
  d = jax.devices()[0]
  return dict(device_kind=d.device_kind, platform=d.platform, device_count=jax.device_count(),
              process_count=jax.process_count(), jax_version=jax.__version__)


def memory_report(compiled, platform_name: str) -> dict:
  import jax
  out = {}
  try:
    ma = compiled.memory_analysis()
    if ma is not None:
      out["xla_temp_gb"] = ma.temp_size_in_bytes / 1e9
      out["xla_argument_gb"] = ma.argument_size_in_bytes / 1e9
  except Exception:  # pylint: disable=broad-except
    pass  # not every backend reports it
  if platform_name == "cpu":
    out["rss_peak_gb"] = lifetime_peak_rss() / 1e9  # PeakRss resets the kernel's own high-water mark
  else:
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
      out["device_peak_gb"] = stats["peak_bytes_in_use"] / 1e9
    if "bytes_limit" in stats:
      out["device_limit_gb"] = stats["bytes_limit"] / 1e9
  return out


def run_one(args, remat: str, dtype: str, log) -> dict:
  """Builds the stage's train state and step as train_stage does and times the step."""
  import jax
  from tinyvlm_jax.models.tinyvlm import TinyVLM, param_shapes
  from tinyvlm_jax.train import flops as flops_lib
  from tinyvlm_jax.train import loop
  from tinyvlm_jax.train import optimizer as optim_lib
  from tinyvlm_jax.train import sharding as shd
  from tinyvlm_jax.train import step as step_lib

  cfg = bench_config(args, remat, dtype)
  model_cfg = loop.train_model_config(cfg)
  model = TinyVLM(model_cfg)
  mesh = shd.make_mesh(cfg.mesh.to_dict())
  loop._check_batch(cfg, mesh)  # pylint: disable=protected-access
  shapes = param_shapes(model_cfg)
  trainable, frozen = tuple(cfg.trainable), tuple(cfg.frozen)
  schedule = optim_lib.make_schedule(cfg.schedule.kind, cfg.schedule.lr_max, cfg.schedule.lr_min, cfg.total_steps,
                                     cfg.schedule.warmup_steps)
  extra = {"lr_warmup": cfg.lr_warmup.to_dict()} if "lr_warmup" in cfg else {}
  tx = optim_lib.make_optimizer(shapes, trainable=trainable, frozen=frozen, schedule=schedule,
                                lr_mults=cfg.lr_mults.to_dict(), b1=cfg.optim.b1, b2=cfg.optim.b2, eps=cfg.optim.eps,
                                weight_decay=cfg.optim.weight_decay, clip_norm=cfg.optim.clip_norm, **extra)
  specs = shd.param_specs(shapes, [tuple(r) for r in cfg.partition_rules], mesh,
                          fsdp_min_elements=cfg.fsdp_min_elements)
  shardings = step_lib.state_shardings(mesh, specs, tx, shapes)
  peak, peak_source = flops_lib.peak_flops_per_device(cfg.peak_flops_per_device)

  t0 = time.perf_counter()
  params, _ = loop.initial_params(cfg, model_cfg, lambda s: None)
  state = step_lib.create_sharded_state(params, tx, cfg.seed, shardings)
  del params
  jax.block_until_ready(state)
  init_s = time.perf_counter() - t0
  train_shapes, _ = optim_lib.split_trainable(shapes, optim_lib.param_labels(shapes, trainable, frozen))
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
  n_train = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(train_shapes))
  log(f"{cfg.stage} {args.preset}: {n_params / 1e6:.1f} M params, {n_train / 1e6:.1f} M trainable {list(trainable)}; "
      f"mesh {dict(mesh.shape)}; compute {model_cfg.dtype}, remat {remat}; state built in {init_s:.1f} s")

  step_cfg = step_lib.StepConfig(trainable=trainable, frozen=frozen, grad_accum_steps=cfg.grad_accum_steps,
                                 neftune_alpha=cfg.loss.neftune_alpha, max_targets=cfg.loss.max_targets)
  step_fn = step_lib.make_train_step(model, tx, step_cfg, schedule, mesh)
  batch = full_batch(model_cfg, args.batch, args.seq_len)
  batch = loop._model_batch(batch, model_cfg)  # pylint: disable=protected-access
  global_batch = shd.global_batch(mesh, batch)
  t0 = time.perf_counter()
  compiled = step_lib.jit_train_step(step_fn, mesh, shardings, batch).lower(state, global_batch).compile()
  compile_s = time.perf_counter() - t0
  log(f"  compiled in {compile_s:.1f} s")

  t0 = time.perf_counter()
  state, metrics = compiled(state, global_batch)
  metrics = jax.device_get(metrics)
  warmup_s = time.perf_counter() - t0
  losses = [float(metrics["loss"])]
  times = []
  with PeakRss() as rss:
    for i in range(args.steps):
      t0 = time.perf_counter()
      state, metrics = compiled(state, global_batch)
      jax.block_until_ready(state)
      metrics = jax.device_get(metrics)
      times.append(time.perf_counter() - t0)
      losses.append(float(metrics["loss"]))
      log(f"  step {i + 1}/{args.steps}: {times[-1]:.2f} s, loss {losses[-1]:.4f}")
  step_s = statistics.median(times)

  rows, seq_len = batch["input_ids"].shape
  tokens = float(metrics["tokens"])
  images = float(np.sum(batch["has_image"]))
  head_rows = rows * (cfg.loss.max_targets or seq_len - 1)
  model_flops = flops_lib.step_flops(model_cfg, shapes, tokens=tokens, images=images, head_positions=head_rows,
                                     seq_len=seq_len)
  n_dev = jax.device_count()
  out = dict(remat=remat, dtype=model_cfg.dtype, status="ok", compile_s=compile_s, init_s=init_s, warmup_s=warmup_s,
             step_s=step_s, step_s_all=times, tokens=tokens, tokens_per_s=tokens / step_s,
             samples_per_s=rows / step_s, model_tflops_per_step=model_flops / 1e12,
             model_tflops_per_s=model_flops / step_s / 1e12, peak_flops_per_device=peak, peak_source=peak_source,
             mfu=model_flops / (step_s * n_dev * peak) if peak else None, loss=losses,
             params_m=n_params / 1e6, trainable_m=n_train / 1e6, mesh=dict(mesh.shape))
  out.update(memory_report(compiled, jax.devices()[0].platform))
  if jax.devices()[0].platform == "cpu":
    out["rss_steps_gb"] = rss.peak / 1e9
  return out


def child_main(args) -> None:
  os.dup2(2, 1)  # whatever the libraries print goes to stderr: the parent's last stdout line is its JSON
  def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)

  remat, dtype = args.remat, args.dtype
  try:
    result = run_one(args, remat, dtype, log)
  except Exception as e:  # pylint: disable=broad-except
    text = f"{type(e).__name__}: {e}"
    oom = "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()
    result = dict(remat=remat, dtype=dtype, status="oom" if oom else "error", error=text[:2000])
    log(f"  {result['status']}: {text[:500]}")
  try:
    result["machine"] = device_info()
  except Exception:  # pylint: disable=broad-except
    pass
  with open(args.child_out, "w") as f:
    json.dump(result, f)


# ---------------------------------------------------------------------------------------
# Parent: one child process per configuration, then the summary.

def run_child(args, remat: str, dtype: str, peak: float) -> dict:
  with tempfile.TemporaryDirectory() as tmp:
    out_path = os.path.join(tmp, "result.json")
    cmd = [sys.executable, os.path.abspath(__file__), "--child-out", out_path, "--config", args.config,
           "--preset", args.preset, "--batch", str(args.batch), "--seq-len", str(args.seq_len), "--remat", remat,
           "--dtype", dtype, "--steps", str(args.steps), "--mesh", args.mesh, "--peak-flops", repr(peak)]
    proc = subprocess.run(cmd, check=False)  # the child logs to stderr and keeps stdout for our JSON
    if os.path.exists(out_path):
      with open(out_path) as f:
        return json.load(f)
  reason = f"exit status {proc.returncode}"
  if proc.returncode < 0:
    name = signal.Signals(-proc.returncode).name
    reason = f"killed by {name}" + (" (out of memory: the kernel's OOM killer?)" if name == "SIGKILL" else "")
  return dict(remat=remat, dtype=dtype, status="oom" if proc.returncode == -signal.SIGKILL else "error",
              error=f"the benchmark process for remat={remat} dtype={dtype} died: {reason}")


def summary_line(r: dict) -> str:
  if r["status"] != "ok":
    return f"remat={r['remat']:5s} dtype={r['dtype']:8s} {r['status'].upper()}: {r['error'][:300]}"
  mem = (f"RSS {r['rss_peak_gb']:.2f} GB (steps {r['rss_steps_gb']:.2f})" if "rss_peak_gb" in r
         else f"device peak {r.get('device_peak_gb', float('nan')):.2f} GB")
  mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
  return (f"remat={r['remat']:5s} dtype={r['dtype']:8s} compile {r['compile_s']:6.1f} s  step {r['step_s']:7.3f} s  "
          f"{r['tokens_per_s']:9.1f} tok/s  {r['samples_per_s']:7.3f} samples/s  "
          f"{r['model_tflops_per_step']:.2f} TFLOP/step  MFU {mfu}  {mem}")


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config", default=DEFAULT_CONFIG, help="stage config file (default configs/stage2.py)")
  p.add_argument("--preset", default="tinyvlm_0p6b")
  p.add_argument("--batch", type=int, default=16, help="global batch (rows)")
  p.add_argument("--seq-len", type=int, default=1024, help="LLM tokens per row, the visual tokens included")
  p.add_argument("--remat", default="none,full", help="comma list of QwenConfig.remat options")
  p.add_argument("--dtype", default="auto", help="comma list of compute dtypes (auto: float32 on CPU, else bfloat16)")
  p.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up step (median reported)")
  p.add_argument("--mesh", default="data=-1,fsdp=1,tensor=1")
  p.add_argument("--peak-flops", type=float, default=0.0, help="peak FLOP/s per device (0: flops.py's lookup)")
  p.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  args.config = os.path.abspath(args.config)
  if args.child_out:
    child_main(args)
    return

  from tinyvlm_jax.models.qwen2 import _REMAT_POLICIES  # pylint: disable=protected-access
  remats = [r.strip() for r in args.remat.split(",") if r.strip()]
  dtypes = [d.strip() for d in args.dtype.split(",") if d.strip()]
  known_remat = ["none", *_REMAT_POLICIES]
  bad = [r for r in remats if r not in known_remat]
  if bad:
    raise SystemExit(f"--remat {args.remat!r}: unknown option(s) {bad}; QwenConfig.remat takes {known_remat}")
  bad = [d for d in dtypes if d not in ("auto", "float32", "bfloat16", "float16")]
  if bad:
    raise SystemExit(f"--dtype {args.dtype!r}: unknown dtype(s) {bad}; expected auto, float32, bfloat16 or float16")
  if args.batch < 1 or args.steps < 1:
    raise SystemExit(f"--batch {args.batch} and --steps {args.steps} must be at least 1")
  cfg = bench_config(args, remats[0], dtypes[0])
  n_vis = visual_tokens(cfg)
  if args.seq_len < n_vis + MIN_TEXT_TOKENS:
    raise SystemExit(f"--seq-len {args.seq_len} is too short: preset {args.preset!r} in {cfg.stage} "
                     f"(use_cnn={cfg.model.use_cnn}) has {n_vis} visual tokens per image; give at least "
                     f"{n_vis + MIN_TEXT_TOKENS} ({MIN_TEXT_TOKENS} text tokens)")

  started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
  load_before = [round(x, 2) for x in os.getloadavg()]
  print(f"{cfg.stage} train step, preset {args.preset}: batch {args.batch} x {args.seq_len} tokens ({n_vis} visual), "
        f"trainable {list(cfg.trainable)}, NEFTune alpha {cfg.loss.neftune_alpha}; {args.steps} timed steps; "
        f"load average {load_before}", flush=True)
  results, machine, peak, peak_source = [], {}, args.peak_flops, "--peak-flops"
  for remat in remats:
    for dtype in dtypes:
      r = run_child(args, remat, dtype, peak)
      machine = machine or r.pop("machine", {})
      r.pop("machine", None)
      if r["status"] == "ok":
        if not peak:  # one peak for every configuration (CPU: measured once, by the first)
          peak, peak_source = r["peak_flops_per_device"], r["peak_source"]
        elif not args.peak_flops:
          r["peak_source"] = peak_source
      results.append(r)
      print(summary_line(r), flush=True)

  paper = load_stage_config(args.config)  # the stage's own steps and batch, before the overrides
  samples = paper.total_steps * paper.global_batch_size
  anchor_rate = samples / (PAPER_STAGE2_A100_HOURS * 3600)
  anchor = dict(a100_hours=PAPER_STAGE2_A100_HOURS, steps=paper.total_steps, global_batch=paper.global_batch_size,
                samples_per_s=anchor_rate,
                note=(f"TinyVLM paper, stage 2: {PAPER_STAGE2_A100_HOURS} A100-hours for {paper.total_steps:,} steps "
                      f"x {paper.global_batch_size} samples = {anchor_rate:.2f} "
                      "samples/s; its sequence lengths are not given"))
  ok = [r for r in results if r["status"] == "ok"]
  if ok:
    from tinyvlm_jax.train.flops import PEAK_FLOPS
    per_sample = ok[0]["model_tflops_per_step"] * 1e12 / args.batch
    anchor["mfu_at_this_shape"] = per_sample * anchor_rate / PEAK_FLOPS["nvidia a100"]
    anchor["mfu_note"] = (f"the anchor rate on one A100 ({PEAK_FLOPS['nvidia a100'] / 1e12:.0f} TFLOP/s bf16) with "
                          f"this run's {per_sample / 1e12:.2f} TFLOP per sample ({args.seq_len} tokens)")
  machine.update(cpu_count=os.cpu_count(), load_average_before=load_before,
                 load_average_after=[round(x, 2) for x in os.getloadavg()], date=started,
                 host_cpu=platform.processor() or platform.machine(), python=platform.python_version())
  print(f"paper anchor: {anchor['samples_per_s']:.2f} samples/s on A100s"
        + (f" (MFU {100 * anchor['mfu_at_this_shape']:.1f}% at this shape)" if ok else ""))
  print(json.dumps(dict(benchmark="train_step", stage=cfg.stage, config=os.path.relpath(args.config, REPO),
                        preset=args.preset, batch=args.batch, seq_len=args.seq_len, visual_tokens=n_vis,
                        trainable=list(cfg.trainable), neftune_alpha=cfg.loss.neftune_alpha, steps=args.steps,
                        mesh=args.mesh, machine=machine, paper_anchor=anchor, results=results)))


if __name__ == "__main__":
  main()
