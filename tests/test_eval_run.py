"""launch/eval.py end to end on a small file of every benchmark layout, and launch/generate.py."""

import io
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tinyvlm_jax.eval.benchmarks import read_benchmark, score_benchmark
from tinyvlm_jax.eval.runner import read_predictions
from tinyvlm_jax.model_io import save_model
from tinyvlm_jax.models.tinyvlm import init_params
from tinyvlm_jax.presets import model_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  """A small random TinyVLM with Qwen2.5's real vocabulary (the demo preset), as a model folder."""
  cfg = model_config("demo")
  out = tmp_path_factory.mktemp("model")
  save_model(out / "m", init_params(cfg, jax.random.key(0)), cfg)
  return str(out / "m")


def _png(seed):
  rng = np.random.default_rng(seed)
  buf = io.BytesIO()
  Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(buf, format="PNG")
  return {"bytes": buf.getvalue(), "path": f"{seed}.png"}


def _write(name, path, n=3):
  img = [_png(i) for i in range(n)]
  rows = {
      "vqav2": dict(question_id=list(range(n)), question=[f"What is {i}?" for i in range(n)], image=img,
                    answers=[[{"answer": "red", "answer_confidence": "yes", "answer_id": j} for j in range(10)]] * n,
                    multiple_choice_answer=["red"] * n, answer_type=["other"] * n),
      "textvqa": dict(question_id=list(range(n)), question=["what is written?"] * n, image=img,
                      answers=[["stop"] * 10] * n, ocr_tokens=[["stop"]] * n),
      "pope": dict(question_id=list(range(n)), question=["Is there a dog in the image?"] * n, image=img,
                   answer=["yes", "no", "yes"][:n], category=["random", "popular", "adversarial"][:n]),
      "mmmu": dict(id=[f"validation_Art_{i}" for i in range(n)], question=["Which one? <image 1>"] * n,
                   options=["['cat', 'dog', 'cow']"] * n, answer=["A", "B", "C"][:n],
                   image_1=img, question_type=["multiple-choice"] * n, subfield=["Art"] * n),
      "realworldqa": dict(question=["Which way? A. left B. right\nPlease answer directly with only the letter."] * n,
                          answer=["A", "B", "A"][:n], image=img),
  }[name]
  pq.write_table(pa.table(rows), path)


@pytest.fixture(scope="module")
def generator(model_dir):
  """One generator for every benchmark: programs compile once per (batch, bucket) shape."""
  from tinyvlm_jax.generate import VLMGenerator
  from tinyvlm_jax.model_io import load_model
  from tinyvlm_jax.serving import load_model_tokenizer
  config, params = load_model(model_dir)
  tok = load_model_tokenizer(model_dir)
  return config, tok, VLMGenerator(config, params, stop_ids=tok.stop_ids, pad_id=tok.pad_id)


@pytest.mark.parametrize("benchmark", ["vqav2", "textvqa", "pope", "mmmu", "realworldqa"])
def test_eval_end_to_end_and_resume(benchmark, generator, tmp_path):
  from tinyvlm_jax.eval.runner import evaluate
  config, tok, gen = generator
  data = tmp_path / f"{benchmark}.parquet"
  _write(benchmark, data)
  out = tmp_path / "out"
  items = read_benchmark(benchmark, str(data))
  first = evaluate(gen, config, tok, items[:2], benchmark=benchmark, out_dir=str(out), batch_size=2,
                   max_new_tokens=4, progress=False)
  assert first["n"] == 2 and first["generated_this_run"] == 2
  second = evaluate(gen, config, tok, items, benchmark=benchmark, out_dir=str(out), batch_size=2,
                    max_new_tokens=4, progress=False)
  assert second["n"] == 3 and second["generated_this_run"] == 1  # resumed: only the new item ran
  with open(out / "results.json") as f:
    results = json.load(f)
  preds = read_predictions(str(out / "predictions.jsonl"))
  assert len(preds) == 3
  # the stored metrics are the metric functions applied to the stored predictions
  assert results["metrics"] == json.loads(json.dumps(score_benchmark(benchmark, items, preds)))
  for key in ("seconds", "ttft_p50", "ttft_p90", "decode_tokens_per_second", "compiled_programs"):
    assert key in results
  assert results["ttft_p50"] > 0 and results["compiled_programs"] >= 1


def test_eval_cli_and_generate_cli(model_dir, tmp_path):
  data = tmp_path / "pope.parquet"
  _write("pope", data)
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, os.path.join(ROOT, "launch/eval.py"), "--checkpoint", model_dir,
                      "--benchmark", "pope", "--data", str(data), "--out", str(tmp_path / "o"), "--no-progress",
                      "--matmul-dtype", "bfloat16"],
                     capture_output=True, text=True, env=env)
  assert r.returncode == 0, r.stderr
  results = json.loads(r.stdout.strip().splitlines()[-1])
  assert results["n"] == 3 and results["matmul_dtype"] == "bfloat16"
  img = tmp_path / "x.png"
  img.write_bytes(_png(5)["bytes"])
  r = subprocess.run([sys.executable, os.path.join(ROOT, "launch/generate.py"), "--checkpoint", model_dir,
                      "--image", str(img), "--prompt", "What is this?", "--max-new-tokens", "5", "--quantize", "int8",
                      "--matmul-dtype", "bfloat16"],
                     capture_output=True, text=True, env=env)
  assert r.returncode == 0, r.stderr
  assert "TTFT" in r.stderr and "tokens/s" in r.stderr
  r = subprocess.run([sys.executable, os.path.join(ROOT, "launch/eval.py"), "--checkpoint", model_dir,
                      "--benchmark", "pope", "--data", str(data), "--out", str(tmp_path / "o3"), "--quantize", "int3"],
                     capture_output=True, text=True, env=env)
  assert r.returncode == 2 and "int3" in r.stderr and "Traceback" not in r.stderr
  # a user's mistake is one line and exit code 2
  r = subprocess.run([sys.executable, os.path.join(ROOT, "launch/eval.py"), "--checkpoint", str(tmp_path),
                      "--benchmark", "pope", "--data", str(data), "--out", str(tmp_path / "o2")],
                     capture_output=True, text=True, env=env)
  assert r.returncode == 2 and "holds no TinyVLM model folder" in r.stderr and "Traceback" not in r.stderr
