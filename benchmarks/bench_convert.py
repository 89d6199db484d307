"""Conversion at full size: a random TinyVLM (preset tinyvlm_0p6b) JAX -> PyTorch export -> JAX.

  python benchmarks/bench_convert.py [--preset tinyvlm_0p6b] [--workdir DIR] [--keep]

Each direction runs the real CLI (convert/jax_to_torch.py, convert/torch_to_jax.py) in its own
process, so its seconds include interpreter start-up and imports and its peak RSS (from
wait4's rusage) is its own. Goal (issue 4): each direction <= 60 s with peak RSS <= 2.5x the
fp32 model size. The round trip is checked bit-exact. Last line: one JSON object.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np

from tinyvlm_jax import model_io
from tinyvlm_jax.convert.mapping import flatten
from tinyvlm_jax.models.tinyvlm import count_params, param_shapes
from tinyvlm_jax.presets import model_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SECONDS_GOAL = 60.0
RSS_GOAL = 2.5  # x fp32 model size


def run_measured(cmd: list[str], log_dir: str) -> dict:
  """Runs `cmd`; returns its wall seconds and peak RSS from the kernel's rusage of that one child."""
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu")
  out_path, err_path = os.path.join(log_dir, "stdout.txt"), os.path.join(log_dir, "stderr.txt")
  with open(out_path, "w") as out, open(err_path, "w") as err:
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=err)
    _, status, usage = os.wait4(proc.pid, 0)  # reap it here: Popen.wait would drop the rusage
    seconds = time.perf_counter() - start
  proc.returncode = os.waitstatus_to_exitcode(status)
  if proc.returncode != 0:
    with open(err_path) as f:
      raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{f.read()[-4000:]}")
  with open(out_path) as f:
    last = f.read().strip().splitlines()[-1]
  return {"seconds": round(seconds, 1), "peak_rss_gb": round(usage.ru_maxrss * 1024 / 1e9, 2), "cli": last}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--preset", default="tinyvlm_0p6b")
  parser.add_argument("--workdir", help="where to write the checkpoints (default: a temporary folder)")
  parser.add_argument("--keep", action="store_true", help="keep the checkpoints")
  parser.add_argument("--make", help=argparse.SUPPRESS)  # internal: write a random model folder here
  args = parser.parse_args()
  cfg = model_config(args.preset)
  if args.make:
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: rng.standard_normal(s.shape, dtype=np.float32), param_shapes(cfg))
    print(model_io.save_model(args.make, params, cfg))
    return
  work = args.workdir or tempfile.mkdtemp(prefix="bench_convert_")
  os.makedirs(work, exist_ok=True)
  src, export, back = (os.path.join(work, n) for n in ("jax_model", "torch_export", "jax_back"))
  for d in (src, export, back):
    shutil.rmtree(d, ignore_errors=True)

  start = time.perf_counter()
  # The random model is made in a child process too: a fork inherits the parent's resident pages,
  # which would count in the measured children's peak RSS.
  made = run_measured([sys.executable, os.path.abspath(__file__), "--preset", args.preset, "--make", src], work)
  n = count_params(param_shapes(cfg))
  model_bytes = 4 * n
  print(f"{args.preset}: {n / 1e6:.1f} M parameters, {model_bytes / 1e9:.2f} GB fp32; random model folder "
        f"written in {time.perf_counter() - start:.1f} s (peak RSS {made['peak_rss_gb']} GB)", flush=True)

  results = {}
  for name, cmd in (("jax_to_torch", ["convert/jax_to_torch.py", "--checkpoint", src, "--out", export]),
                    ("torch_to_jax", ["convert/torch_to_jax.py", "--input", export, "--out", back])):
    r = run_measured([sys.executable, os.path.join(REPO, cmd[0]), *cmd[1:]], work)
    r["rss_x_model"] = round(r["peak_rss_gb"] * 1e9 / model_bytes, 2)
    r["meets_goal"] = r["seconds"] <= SECONDS_GOAL and r["rss_x_model"] <= RSS_GOAL
    results[name] = r
    print(f"{name}: {r['seconds']} s, peak RSS {r['peak_rss_gb']} GB ({r['rss_x_model']}x model) | {r['cli']}",
          flush=True)

  _, a = model_io.load_model(src)
  _, b = model_io.load_model(back)
  fa, fb = flatten(a), flatten(b)
  exact = fa.keys() == fb.keys() and all(np.array_equal(fa[k], fb[k]) for k in fa)
  del a, b, fa, fb
  export_files = sorted(f for f in os.listdir(export) if f.endswith(".safetensors"))
  print(f"round trip bit-exact: {exact}; export: {export_files}")
  if not args.keep and not args.workdir:
    shutil.rmtree(work)
  summary = {"preset": args.preset, "params": n, "model_gb_fp32": round(model_bytes / 1e9, 3),
             "cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2),
             "goal": {"seconds": SECONDS_GOAL, "rss_x_model": RSS_GOAL},
             **{k: {kk: vv for kk, vv in v.items() if kk != "cli"} for k, v in results.items()},
             "export_files": len(export_files), "round_trip_bit_exact": exact,
             "meets_goal": exact and all(r["meets_goal"] for r in results.values())}
  print(json.dumps(summary))


if __name__ == "__main__":
  main()
