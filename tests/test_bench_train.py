"""benchmarks/bench_train.py: the figures it reports follow from the step it times; failures are recorded."""

import importlib.util
import json
import re
import os

import jax
import numpy as np
import pytest

from tinyvlm_jax.models.tinyvlm import param_shapes
from tinyvlm_jax.train import flops as flops_lib
from tinyvlm_jax.train import loop

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench():
  spec = importlib.util.spec_from_file_location("bench_train", os.path.join(REPO, "benchmarks", "bench_train.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _args(bench, **kw):
  args = dict(config=bench.DEFAULT_CONFIG, preset="tiny", batch=2, seq_len=0, remat="full", dtype="float32", steps=2,
              mesh="data=-1,fsdp=1,tensor=1", peak_flops=1e11)
  return bench.argparse.Namespace(**{**args, **kw})


def test_one_step_figures_follow_from_the_step():
  bench = _bench()
  args = _args(bench)
  cfg = bench.bench_config(args, args.remat, args.dtype)
  n_vis = bench.visual_tokens(cfg)
  args.seq_len = n_vis + 6
  r = bench.run_one(args, args.remat, args.dtype, lambda s: None)
  assert r["status"] == "ok" and r["remat"] == "full" and r["dtype"] == "float32"
  # Every row is exactly seq_len real tokens.
  assert r["tokens"] == args.batch * args.seq_len
  # The stage-2 model (no CNN, remat in the LLM) and the FLOP count of loop.py's formula.
  model_cfg = loop.train_model_config(cfg)
  assert not model_cfg.use_cnn and model_cfg.llm.remat == "full"
  flops = flops_lib.step_flops(model_cfg, param_shapes(model_cfg), tokens=args.batch * args.seq_len,
                               images=args.batch, head_positions=args.batch * (args.seq_len - 1),
                               seq_len=args.seq_len)
  np.testing.assert_allclose(r["model_tflops_per_step"] * 1e12, flops, rtol=1e-9)
  np.testing.assert_allclose(r["mfu"], flops / (r["step_s"] * jax.device_count() * 1e11), rtol=1e-9)
  np.testing.assert_allclose(r["tokens_per_s"] * r["step_s"], args.batch * args.seq_len, rtol=1e-9)
  np.testing.assert_allclose(r["samples_per_s"] * r["step_s"], args.batch, rtol=1e-9)
  assert r["step_s"] == pytest.approx(float(np.median(r["step_s_all"])))
  assert len(r["step_s_all"]) == args.steps and len(r["loss"]) == args.steps + 1
  # A real step of a random model: the loss starts near ln(vocab) (stage 2's LR of 1e-6 hardly moves it).
  assert all(np.isfinite(r["loss"]))
  np.testing.assert_allclose(r["loss"][0], np.log(model_cfg.llm.vocab_size), rtol=0.1)
  assert r["rss_peak_gb"] > 0 and r["rss_steps_gb"] > 0 and r["xla_temp_gb"] > 0


def test_sequence_shorter_than_the_visual_tokens_is_refused():
  bench = _bench()
  with pytest.raises(SystemExit, match=r"has 20 visual tokens"):
    bench.main(["--preset", "tiny", "--seq-len", "20"])


def test_a_failing_configuration_is_recorded_and_the_next_runs(capsys):
  bench = _bench()
  # A mesh of 7 devices: each configuration's process fails before compiling, and the run goes on.
  bench.main(["--preset", "tiny", "--batch", "2", "--seq-len", "30", "--remat", "none,full", "--steps", "1",
              "--mesh", "data=1,fsdp=7"])
  out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert [(r["remat"], r["status"]) for r in out["results"]] == [("none", "error"), ("full", "error")]
  assert all(re.search(r"does not fit \d+ devices", r["error"]) for r in out["results"])
  anchor = out["paper_anchor"]
  np.testing.assert_allclose(anchor["samples_per_s"], anchor["steps"] * anchor["global_batch"] / (77.5 * 3600))
  assert out["machine"]["cpu_count"] == os.cpu_count()


def test_peak_rss_measures_its_block_and_keeps_the_lifetime_peak():
  from tinyvlm_jax.cpu_runtime import PeakRss, lifetime_peak_rss
  big = np.ones(400_000_000 // 8)  # a 400 MB peak before the block, freed
  del big
  with PeakRss() as rss:
    block = np.ones(100_000_000 // 8)
    del block
  assert rss.peak >= 100e6  # the block's 100 MB are in its peak
  assert rss.peak < lifetime_peak_rss() - 200e6  # the earlier peak is not, but the lifetime keeps it
