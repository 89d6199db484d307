"""launch/train.py end to end on the tiny preset: exact resume, preemption, crashes, NaN, 8 <-> 1
devices, and 2 processes x 4 devices.

Every run is a subprocess (`python launch/train.py --config <tiny config> --workdir ...`); they
share the session's persistent compilation cache (conftest.py), so each distinct program compiles
once per session.
Faults are injected through TINYVLM_FAULT (tinyvlm_jax/train/loop.py).
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest

from tinyvlm_jax.train.testing import xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(REPO, "launch", "train.py")
STAGE = "tiny"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  from tinyvlm_jax.data import synthetic
  from tinyvlm_jax.train.testing import byte_tokenizer
  root = tmp_path_factory.mktemp("train_loop")
  tok = byte_tokenizer(str(root / "tokenizer"))
  data = synthetic.write_llava(str(root / "data"), "train", 96, seed=0, image_size=32)
  config = root / "tiny_config.py"
  config.write_text(
      "from tinyvlm_jax.train.testing import tiny_stage_config\n\n\n"
      f"def get_config():\n  return tiny_stage_config({data!r}, {tok!r})\n")
  # The environment carries the session's compilation cache (conftest.py) to every run.
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  env.pop("TINYVLM_FAULT", None)
  return {"root": root, "config": str(config), "env": env}


def train(setup, workdir, *args, devices=1, fault=None, expect=0, timeout=420):
  env = dict(setup["env"], XLA_FLAGS=xla_flags(devices))
  if fault:
    env["TINYVLM_FAULT"] = fault
  cmd = [sys.executable, TRAIN, "--config", setup["config"], "--workdir", str(workdir), "--progress=false", *args]
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
  if proc.returncode != expect:
    raise AssertionError(f"exit {proc.returncode}, expected {expect}:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
  return proc.stdout + proc.stderr


def losses(workdir):
  with open(os.path.join(workdir, STAGE, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return [r["step"] for r in rows], [r["loss"] for r in rows]


def committed(workdir):
  ckpt = os.path.join(workdir, STAGE, "checkpoints")
  return sorted(int(d) for d in os.listdir(ckpt) if d.isdigit())


def load_params(path):
  from tinyvlm_jax import model_io
  return model_io.load_model(path)[1]


def max_diff(a, b):
  import jax
  return max(jax.tree.leaves(jax.tree.map(lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)))), a, b)))


def identical(a, b):
  import jax
  return all(jax.tree.leaves(jax.tree.map(lambda x, y: np.array_equal(np.asarray(x), np.asarray(y)), a, b)))


@pytest.fixture(scope="module")
def straight(setup):
  """6 steps without interruption on 1 device (checkpoints at 3 and 6)."""
  wd = setup["root"] / "straight"
  out = train(setup, wd)
  assert committed(wd) == [3, 6], out
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(wd / STAGE / "tb"))  # TensorBoard
  return wd


def test_frozen_module_is_bit_identical_to_its_init(setup, straight):
  import jax
  from tinyvlm_jax.models.tinyvlm import init_params
  from tinyvlm_jax.presets import model_config
  from tinyvlm_jax.train.testing import tiny_stage_config
  cfg = tiny_stage_config("", "")
  init = jax.device_get(init_params(model_config(cfg.model), jax.random.PRNGKey(cfg.seed)))
  trained = load_params(os.path.join(straight, STAGE, "model"))
  assert "vision" not in cfg.trainable
  assert identical(trained["vision"], init["vision"])
  assert not identical(trained["connector"], init["connector"])


def test_interrupted_run_resumes_bit_identically(setup, straight):
  wd = setup["root"] / "interrupted"
  # (a) kill -9 right after step 3's checkpoint is committed.
  train(setup, wd, fault="kill_after_commit:3", expect=-signal.SIGKILL)
  assert committed(wd) == [3]
  # (c) resume, and kill -9 in the middle of step 6's (async) save: its temporary folder is
  # never renamed, so step 3 stays the latest usable checkpoint.
  out = train(setup, wd, fault="kill_during_save:6", expect=-signal.SIGKILL)
  assert "resumed from step 3" in out and committed(wd) == [3]
  # Preemption: SIGTERM after step 4 saves step 4 and exits cleanly.
  out = train(setup, wd, fault="sigterm_after_step:4")
  assert "resumed from step 3" in out and "stopped by SIGTERM at step 4" in out and committed(wd) == [3, 4]
  out = train(setup, wd)
  assert "resumed from step 4" in out and committed(wd)[-1] == 6
  ref_steps, ref_losses = losses(straight)
  steps, got = losses(wd)
  assert steps == ref_steps == [1, 2, 3, 4, 5, 6]
  assert got == ref_losses  # the same loss log, bit for bit
  assert ref_losses[-1] < ref_losses[0]
  assert identical(load_params(os.path.join(wd, STAGE, "model")), load_params(os.path.join(straight, STAGE, "model")))


def test_nan_loss_stops_and_keeps_last_good_checkpoint(setup):
  wd = setup["root"] / "nan"
  out = train(setup, wd, fault="nan_batch_at_step:5", expect=3)
  assert "at step 5" in out and "last good checkpoint is step 3" in out, out[-2000:]
  assert committed(wd) == [3]
  steps, _ = losses(wd)
  assert steps == [1, 2, 3, 4]


@pytest.fixture(scope="module")
def eight_devices(setup):
  """3 steps on one process with 8 devices (data=2, fsdp=4)."""
  wd = setup["root"] / "eight_devices"
  train(setup, wd, "--config.mesh.data=2", "--config.mesh.fsdp=4", "--config.total_steps=3", devices=8)
  assert committed(wd) == [3]
  return wd


def test_checkpoint_moves_between_1_and_8_devices(setup, straight, eight_devices):
  ref = load_params(os.path.join(straight, STAGE, "model"))
  # 1 device -> 8: resume the straight run's step-3 checkpoint on a data=2, fsdp=4 mesh.
  wd = setup["root"] / "to8"
  shutil.copytree(os.path.join(straight, STAGE, "checkpoints"), os.path.join(wd, STAGE, "checkpoints"))
  shutil.rmtree(os.path.join(wd, STAGE, "checkpoints", "6"))
  out = train(setup, wd, "--config.mesh.data=2", "--config.mesh.fsdp=4", devices=8)
  assert "resumed from step 3" in out and "mesh {'data': 2, 'fsdp': 4, 'tensor': 1}" in out
  assert max_diff(load_params(os.path.join(wd, STAGE, "model")), ref) < 1e-5
  # 8 devices -> 1: the 8-device run's step-3 checkpoint, finished on one device.
  wd1 = setup["root"] / "from8"
  shutil.copytree(os.path.join(eight_devices, STAGE, "checkpoints"), os.path.join(wd1, STAGE, "checkpoints"))
  out = train(setup, wd1, devices=1)
  assert "resumed from step 3" in out and "mesh {'data': 1, 'fsdp': 1, 'tensor': 1}" in out
  assert max_diff(load_params(os.path.join(wd1, STAGE, "model")), ref) < 1e-5


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_match_one_process(setup, eight_devices):
  wd = setup["root"] / "two_processes"
  port = _free_port()
  env = dict(setup["env"], XLA_FLAGS=xla_flags(4))
  procs = [subprocess.Popen(
      [sys.executable, TRAIN, "--config", setup["config"], "--workdir", str(wd), "--progress=false",
       "--config.mesh.data=2", "--config.mesh.fsdp=4", "--config.total_steps=3",
       f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outs = [p.communicate(timeout=420)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-4000:] for o in outs)
  assert "(2 processes)" in outs[0]
  prints = []
  for i in range(2):
    with open(os.path.join(wd, STAGE, "fingerprints", f"process_{i}.json")) as f:
      prints.append(json.load(f))
  assert prints[0] == prints[1]  # both processes hold the same (full) parameters
  assert not any("partial" in v for v in prints[0].values())
  assert "records seen 12," in outs[0]  # process 0 read its share: 3 steps x 4 rows, not 3 x 8
  got = load_params(os.path.join(wd, STAGE, "model"))
  assert max_diff(got, load_params(os.path.join(eight_devices, STAGE, "model"))) < 1e-5


def test_cli_rejects_unknown_config_field_by_name(setup, tmp_path):
  proc = subprocess.run([sys.executable, TRAIN, "--config", os.path.join(REPO, "configs", "stage2.py"),
                         "--workdir", str(tmp_path), "--config.schedule.lr_maxx=1e-5"],
                        env=setup["env"], capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0
  assert "lr_maxx" in proc.stderr, proc.stderr[-2000:]
  assert not os.listdir(tmp_path)  # nothing ran


def test_generate_and_eval_clis_on_a_trained_workdir(setup, straight, tmp_path):
  """launch/generate.py and launch/eval.py take launch/train.py's workdir as --checkpoint: they find
  the stage's model folder and the tokenizer the data was encoded with (here the test's byte BPE)."""
  from tinyvlm_jax.serving import find_model_dir
  assert find_model_dir(str(straight)) == os.path.join(str(straight), STAGE, "model")
  assert os.path.isfile(os.path.join(str(straight), STAGE, "model", "tokenizer", "tokenizer.json"))
  with open(os.path.join(setup["root"], "data", "train.json")) as f:
    image = os.path.join(setup["root"], "data", json.load(f)[0]["image"])
  env = dict(setup["env"], XLA_FLAGS=xla_flags(1))
  r = subprocess.run([sys.executable, os.path.join(REPO, "launch", "generate.py"), "--checkpoint", str(straight),
                      "--image", image, "--prompt", "What shape is in the image?", "--max-new-tokens", "4"],
                     env=env, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "TTFT" in r.stderr and "tokens/s" in r.stderr
  data = tmp_path / "pope.jsonl"
  data.write_text("".join(json.dumps(dict(question_id=i, question="Is there a circle in the image?", image=image,
                                          answer=a, category="random")) + "\n" for i, a in enumerate(["yes", "no"])))
  r = subprocess.run([sys.executable, os.path.join(REPO, "launch", "eval.py"), "--checkpoint", str(straight),
                      "--benchmark", "pope", "--data", str(data), "--out", str(tmp_path / "out"), "--no-progress"],
                     env=env, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  with open(tmp_path / "out" / "results.json") as f:
    results = json.load(f)
  assert results["n"] == 2 and results["ttft_p50"] > 0
