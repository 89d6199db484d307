"""One training stage end to end, and runs of several stages (configs/demo.py).

  WORKDIR/STAGE/checkpoints/<step>/   orbax: state + data-iterator state (checkpoint.py)
  WORKDIR/STAGE/metrics.jsonl         one line per step (loss, lr, grad_norm, tokens/s, MFU, ...)
  WORKDIR/STAGE/tb/                   TensorBoard events
  WORKDIR/STAGE/loss_curve.png        at the end of the stage
  WORKDIR/STAGE/model/                the final params as a model folder (model_io), the next stage's start

A stage whose latest checkpoint is below `total_steps` resumes from it (params, optimiser,
step, RNG and data position); a finished stage is skipped. SIGTERM / SIGINT: the loop saves
at the current step and stops (`Preempted`). A NaN or inf loss stops it (`NonFiniteLoss`,
naming the step) without saving, so the last good checkpoint stays the latest.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import time
from typing import Any, Callable

import jax
import numpy as np

from tinyvlm_jax import model_io
from tinyvlm_jax.models.config import TinyVLMConfig
from tinyvlm_jax.models.tinyvlm import TinyVLM, init_params, param_shapes
from tinyvlm_jax.presets import model_config
from tinyvlm_jax.train import checkpoint as ckpt_lib
from tinyvlm_jax.train import data as data_lib
from tinyvlm_jax.train import flops as flops_lib
from tinyvlm_jax.train import metrics as metrics_lib
from tinyvlm_jax.train import optimizer as optim_lib
from tinyvlm_jax.train import sharding as shd
from tinyvlm_jax.train import step as step_lib

logger = logging.getLogger(__name__)

MODEL_DIR = "model"
BATCH_KEYS = ("input_ids", "loss_mask", "attention_mask", "positions", "pixel_values", "cnn_pixel_values",
              "has_image", "example_key")
# Fault injection for the tests: "sigterm_after_step:N", "kill_after_commit:N", "kill_during_save:N",
# "nan_batch_at_step:N" (the images of batch N become NaN).
FAULT_ENV = "TINYVLM_FAULT"


class NonFiniteLoss(FloatingPointError):
  pass


class Preempted(RuntimeError):
  pass


@dataclasses.dataclass
class StageResult:
  stage: str
  stage_dir: str
  params: Any
  model_config: TinyVLMConfig
  steps: int
  seconds: float


# ------------------------------------------------------------------------------------------
# Config -> model config, parameters.


def resolve_dtype(name: str) -> str:
  if name == "auto":
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"
  if name not in ("float32", "bfloat16", "float16"):
    raise ValueError(f"compute_dtype={name!r}; expected auto, float32, bfloat16 or float16")
  return name


def train_model_config(cfg) -> TinyVLMConfig:
  """The preset in cfg.model with the stage's compute dtype and remat policy."""
  base = model_config(cfg.model)
  dtype = resolve_dtype(cfg.compute_dtype)
  return dataclasses.replace(
      base, dtype=dtype,
      vision=dataclasses.replace(base.vision, dtype=dtype),
      llm=dataclasses.replace(base.llm, dtype=dtype, remat=cfg.remat),
      cnn=dataclasses.replace(base.cnn, dtype=dtype))


def model_folder(path: str) -> str:
  """A model folder, or a stage directory holding one (STAGE/model)."""
  path = os.path.abspath(os.path.expanduser(path))
  if os.path.isfile(os.path.join(path, MODEL_DIR, model_io.CONFIG_FILE)):
    return os.path.join(path, MODEL_DIR)
  return path


def _check_module(name: str, got, want, source: str) -> None:
  model_io.check_params({name: got}, {name: want}, source)


def initial_params(cfg, model_cfg: TinyVLMConfig, log: Callable[[str], None]) -> tuple[dict, str | None]:
  """Fresh params overwritten module by module from cfg.init -> (params as numpy, tokenizer folder or None)."""
  params = jax.device_get(init_params(model_cfg, jax.random.PRNGKey(cfg.seed)))
  shapes = param_shapes(model_cfg)
  fresh = set(cfg.init.fresh)
  tokenizer_src = None
  if cfg.init.params != "random":
    folder = model_folder(cfg.init.params)
    _, loaded = model_io.load_model(folder)
    if model_io.tokenizer_files(folder):
      tokenizer_src = folder
    taken = []
    for name in params:
      if name in loaded and name not in fresh:
        _check_module(name, loaded[name], shapes[name], folder)
        params[name] = loaded[name]
        taken.append(name)
    log(f"init: {sorted(taken)} from {folder}; fresh: {sorted(set(params) - set(taken))}")
    if model_cfg.use_cnn and "cnn" not in taken and "cnn" not in fresh and not cfg.init.cnn:
      raise ValueError(f"stage {cfg.stage!r} uses the CNN, and {folder} has none: set --config.init.cnn to a model "
                       "folder holding the pretrained ConvNeXt-V2 (or 'random')")
  if model_cfg.use_cnn and "cnn" not in fresh and cfg.init.cnn not in ("", "random"):
    folder = model_folder(cfg.init.cnn)
    _, loaded = model_io.load_model(folder)
    if "cnn" not in loaded:
      raise ValueError(f"init.cnn={cfg.init.cnn!r}: the model folder {folder} has no CNN weights")
    _check_module("cnn", loaded["cnn"], shapes["cnn"], folder)
    params["cnn"] = loaded["cnn"]
    log(f"init: cnn from {folder}")
  return params, tokenizer_src


# ------------------------------------------------------------------------------------------
# Signals and faults.


class StopFlag:
  """SIGTERM / SIGINT set a flag that the loop reads after each step."""

  def __init__(self):
    self.signal_name: str | None = None
    self._old = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._old[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread
        pass
    return self

  def _handle(self, signum, frame):
    del frame
    self.signal_name = signal.Signals(signum).name

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)

  def requested(self) -> bool:
    local = self.signal_name is not None
    if jax.process_count() == 1:
      return local
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return bool(np.any(multihost_utils.process_allgather(np.int32(local))))


def _fault(kind: str, step: int) -> bool:
  spec = os.environ.get(FAULT_ENV, "")
  if not spec:
    return False
  name, _, at = spec.partition(":")
  return name == kind and int(at) == step


# ------------------------------------------------------------------------------------------
# One stage.


def _check_batch(cfg, mesh) -> None:
  div = shd.batch_divisor(mesh)
  micro = cfg.global_batch_size // max(cfg.grad_accum_steps, 1)
  if cfg.global_batch_size % cfg.grad_accum_steps:
    raise ValueError(f"global_batch_size={cfg.global_batch_size} is not a multiple of "
                     f"grad_accum_steps={cfg.grad_accum_steps}")
  if micro % div:
    raise ValueError(f"micro-batch of {micro} rows (global_batch_size / grad_accum_steps) does not split over "
                     f"the {div} devices of the mesh's data and fsdp axes {dict(mesh.shape)}")


def _model_batch(batch: dict[str, np.ndarray], model_cfg: TinyVLMConfig) -> dict[str, np.ndarray]:
  keys = [k for k in BATCH_KEYS if k in batch and (k != "cnn_pixel_values" or model_cfg.use_cnn)]
  return {k: batch[k] for k in keys}


def _check_targets(batch, max_targets: int, step: int) -> None:
  if not max_targets:
    return
  most = int(np.max(np.sum(batch["loss_mask"][:, 1:], axis=1)))
  if most > max_targets:
    raise ValueError(f"step {step}: a row has {most} supervised tokens, more than loss.max_targets={max_targets}; "
                     "raise loss.max_targets (or set it to 0: the LM head on every position)")


def stage_paths(workdir: str, stage: str) -> tuple[str, str]:
  stage_dir = os.path.join(os.path.abspath(workdir), stage)
  return stage_dir, os.path.join(stage_dir, "checkpoints")


def train_stage(cfg, workdir: str, *, log: Callable[[str], None] | None = None, progress: bool = True) -> StageResult:
  """Runs (or resumes, or skips when finished) the stage `cfg` under WORKDIR/cfg.stage."""
  start_time = time.perf_counter()
  log = log or (lambda s: logger.info(s))
  stage_dir, ckpt_dir = stage_paths(workdir, cfg.stage)
  os.makedirs(stage_dir, exist_ok=True)
  model_cfg = train_model_config(cfg)
  model = TinyVLM(model_cfg)
  mesh = shd.make_mesh(cfg.mesh.to_dict())
  _check_batch(cfg, mesh)
  shapes = param_shapes(model_cfg)
  trainable = tuple(cfg.trainable)
  if "cnn" in trainable and model_cfg.use_cnn and mesh.shape.get("tensor", 1) > 1:
    # Measured (tests/test_train_sharding.py's step, jax 0.10.2, XLA:CPU): with a tensor axis the
    # SPMD partitioner returned wrong ConvNeXt depthwise-filter gradients (the size of the
    # gradient itself), whatever the CNN's parameter and input shardings; data/fsdp meshes are exact.
    raise ValueError(f"{cfg.stage}: training the CNN on a mesh with tensor={mesh.shape['tensor']} gives wrong "
                     "depthwise-convolution gradients (XLA SPMD); use --config.mesh.tensor=1 (data/fsdp only) "
                     "for this stage")
  schedule = optim_lib.make_schedule(cfg.schedule.kind, cfg.schedule.lr_max, cfg.schedule.lr_min, cfg.total_steps,
                                     cfg.schedule.warmup_steps)
  frozen = tuple(cfg.frozen)
  tx = optim_lib.make_optimizer(shapes, trainable=trainable, frozen=frozen, schedule=schedule,
                                lr_mults=cfg.lr_mults.to_dict(), lr_warmup=cfg.lr_warmup.to_dict(),
                                b1=cfg.optim.b1, b2=cfg.optim.b2, eps=cfg.optim.eps,
                                weight_decay=cfg.optim.weight_decay, clip_norm=cfg.optim.clip_norm)
  specs = shd.param_specs(shapes, [tuple(r) for r in cfg.partition_rules], mesh,
                          fsdp_min_elements=cfg.fsdp_min_elements)
  shardings = step_lib.state_shardings(mesh, specs, tx, shapes)
  checkpointer = ckpt_lib.Checkpointer(ckpt_dir, every_steps=cfg.checkpoint.every_steps, keep=cfg.checkpoint.keep,
                                       use_async=cfg.checkpoint.use_async)
  export_dir = os.path.join(stage_dir, MODEL_DIR)
  latest = checkpointer.latest_step()
  export_cfg = model_config(cfg.model)
  if latest is not None and latest >= cfg.total_steps and os.path.isfile(os.path.join(export_dir, model_io.CONFIG_FILE)):
    log(f"{cfg.stage}: finished earlier ({latest} steps); using {export_dir}")
    checkpointer.close()
    _, params = model_io.load_model(export_dir)
    return StageResult(cfg.stage, stage_dir, params, export_cfg, latest, 0.0)

  pipeline = data_lib.make_pipeline(cfg, model_cfg)
  template = jax.eval_shape(lambda p: step_lib.init_state(p, tx, cfg.seed), shapes)
  tokenizer_src = None
  if latest is not None:
    state = checkpointer.restore(template, shardings, pipeline)
    log(f"{cfg.stage}: resumed from step {int(state.step)} ({ckpt_dir})")
    tokenizer_src = _tokenizer_note(stage_dir)
  else:
    params, tokenizer_src = initial_params(cfg, model_cfg, log)
    tokenizer_src = _data_tokenizer_folder(cfg) or tokenizer_src  # the tokenizer the data was encoded with
    state = step_lib.create_sharded_state(params, tx, cfg.seed, shardings)
    del params
    _write_tokenizer_note(stage_dir, tokenizer_src)
  step = int(state.step)
  reader = data_lib.Prefetcher(pipeline)  # started after the restore: its first batch is step+1's

  train_shapes, _ = optim_lib.split_trainable(shapes, optim_lib.param_labels(shapes, trainable, frozen))
  n_trainable = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(train_shapes))
  log(f"{cfg.stage}: {sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)) / 1e6:.2f} M params, "
      f"{n_trainable / 1e6:.2f} M trainable {list(trainable)}; mesh {dict(mesh.shape)} on {jax.device_count()} "
      f"{jax.devices()[0].platform} devices ({jax.process_count()} processes); compute {model_cfg.dtype}, "
      f"remat {cfg.remat}")
  step_cfg = step_lib.StepConfig(trainable=trainable, frozen=frozen, grad_accum_steps=cfg.grad_accum_steps,
                                 neftune_alpha=cfg.loss.neftune_alpha, max_targets=cfg.loss.max_targets)
  step_fn = step_lib.make_train_step(model, tx, step_cfg, schedule, mesh)
  train = None
  peak, peak_source = flops_lib.peak_flops_per_device(cfg.peak_flops_per_device)
  writer = metrics_lib.MetricsLogger(stage_dir, start_step=step, total_steps=cfg.total_steps, stage=cfg.stage,
                                     progress=progress)
  last_saved = step if latest is not None else None
  try:
    with StopFlag() as stop:
      t_prev = time.perf_counter()
      while step < cfg.total_steps:
        batch = _model_batch(next(reader), model_cfg)
        _check_targets(batch, cfg.loss.max_targets, step + 1)
        if _fault("nan_batch_at_step", step + 1):
          batch["pixel_values"] = np.full_like(batch["pixel_values"], np.nan)
        if train is None:
          t0 = time.perf_counter()
          train = step_lib.jit_train_step(step_fn, mesh, shardings, batch)
          compiled = train.lower(state, shd.global_batch(mesh, batch)).compile()
          log(f"{cfg.stage}: compiled the train step in {time.perf_counter() - t0:.1f} s; peak FLOP/s per device "
              f"{peak:.3g} ({peak_source})")
          t_prev = time.perf_counter()
        state, metrics = compiled(state, shd.global_batch(mesh, batch))
        metrics = jax.device_get(metrics)
        step += 1
        now = time.perf_counter()
        step_s, t_prev = now - t_prev, now
        loss = float(metrics["loss"])
        if not np.isfinite(loss):
          checkpointer.wait()
          raise NonFiniteLoss(
              f"{cfg.stage}: the loss is {loss} at step {step}; stopped without saving. The last good checkpoint "
              f"is step {checkpointer.latest_step()} in {ckpt_dir}")
        head_rows = (batch["loss_mask"].shape[0] * jax.process_count()
                     * (cfg.loss.max_targets or batch["loss_mask"].shape[1] - 1))
        images = float(np.sum(batch["has_image"])) * jax.process_count()
        model_flops = flops_lib.step_flops(model_cfg, shapes, tokens=float(metrics["tokens"]), images=images,
                                           head_positions=head_rows, seq_len=batch["input_ids"].shape[1])
        row = {k: float(v) for k, v in metrics.items()}
        row.update(step_s=step_s, tokens_per_s=row["tokens"] / step_s, model_tflops=model_flops / 1e12,
                   mfu=(model_flops / (step_s * jax.device_count() * peak)) if peak else 0.0)
        writer.write(step, row)
        if _fault("sigterm_after_step", step):
          os.kill(os.getpid(), signal.SIGTERM)
        if step % cfg.checkpoint.every_steps == 0 or step == cfg.total_steps:
          checkpointer.save(step, state, reader)
          last_saved = step
          if _fault("kill_during_save", step):
            os.kill(os.getpid(), signal.SIGKILL)
          if _fault("kill_after_commit", step):
            checkpointer.wait()
            os.kill(os.getpid(), signal.SIGKILL)
        if stop.requested():
          if last_saved != step:
            checkpointer.save(step, state, reader, force=True)
          checkpointer.wait()
          raise Preempted(f"{cfg.stage}: stopped by {stop.signal_name or 'another process'} at step {step}; "
                          f"checkpoint saved in {ckpt_dir}. Run the same command to resume.")
      checkpointer.wait()
  finally:
    writer.close()
    reader.close()
    pipeline.close()
    checkpointer.close()

  model_io.save_model(export_dir, state.params, export_cfg, tokenizer_src=tokenizer_src, overwrite=True)
  write_fingerprint(os.path.join(stage_dir, "fingerprints"), state.params)
  if jax.process_index() == 0:
    metrics_lib.plot_loss_curves([(cfg.stage, metrics_lib.read_metrics(writer.path))],
                                 os.path.join(stage_dir, metrics_lib.CURVE_FILE))
  stats = reader.get_state()  # as of the last batch trained on (the reader may have read ahead)
  log(f"{cfg.stage}: done at step {step}; model in {export_dir}; records seen {stats['seen']}, bad {stats['bad']}")
  params = jax.device_get(state.params) if jax.process_count() == 1 else state.params
  return StageResult(cfg.stage, stage_dir, params, export_cfg, step, time.perf_counter() - start_time)


def params_fingerprint(params) -> dict[str, list[float]]:
  """{path: [sum, sum of |x|]} in float64 over the copy of each array this process holds.

  Each process assembles every array from its addressable shards; where they do not cover the
  whole array (sharded across hosts), the entry is over the shards it has and marked partial.
  """
  out = {}
  for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      seen, total, total_abs, covered = set(), 0.0, 0.0, 0
      for shard in x.addressable_shards:
        key = tuple((s.start, s.stop) for s in shard.index)
        if key in seen:
          continue
        seen.add(key)
        data = np.asarray(shard.data, np.float64)
        total, total_abs, covered = total + data.sum(), total_abs + np.abs(data).sum(), covered + data.size
      entry = [total, total_abs] + ([] if covered == x.size else ["partial"])
    else:
      data = np.asarray(x, np.float64)
      entry = [float(data.sum()), float(np.abs(data).sum())]
    out[shd.path_name(path)] = entry
  return out


def write_fingerprint(folder: str, params) -> str:
  """Every process writes folder/process_<i>.json: replicas must agree across hosts."""
  os.makedirs(folder, exist_ok=True)
  path = os.path.join(folder, f"process_{jax.process_index()}.json")
  with open(path, "w") as f:
    json.dump(params_fingerprint(params), f, indent=0, sort_keys=True)
  return path


_TOKENIZER_NOTE = "tokenizer_source.txt"


def _data_tokenizer_folder(cfg) -> str | None:
  """The folder of data.tokenizer_path when it holds tokenizer files (the exported model ships them)."""
  path = cfg.data.tokenizer_path
  if not path:
    return None
  folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
  return folder if model_io.tokenizer_files(folder) else None


def _write_tokenizer_note(stage_dir: str, src: str | None) -> None:
  if jax.process_index() == 0:
    with open(os.path.join(stage_dir, _TOKENIZER_NOTE), "w") as f:
      f.write(src or "")


def _tokenizer_note(stage_dir: str) -> str | None:
  path = os.path.join(stage_dir, _TOKENIZER_NOTE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return f.read().strip() or None


# ------------------------------------------------------------------------------------------
# Several stages in one command (configs/demo.py), and the demo's evaluation.


def _expand(value: str, workdir: str) -> str:
  return value.replace("{workdir}", os.path.abspath(workdir)) if isinstance(value, str) else value


def stage_list(cfg) -> list:
  """A multi-stage config (`stages` + `stage_order`) -> its stage configs; a single stage -> [cfg]."""
  if "stages" not in cfg:
    return [cfg]
  missing = [s for s in cfg.stage_order if s not in cfg.stages]
  if missing:
    raise ValueError(f"stage_order names {missing}, not in config.stages ({sorted(cfg.stages)})")
  return [cfg.stages[s] for s in cfg.stage_order]


def prepare_stage(stage_cfg, workdir: str, previous_dir: str | None):
  """{workdir} in data and init paths -> the workdir; init.params 'previous' -> the previous stage."""
  cfg = stage_cfg.copy_and_resolve_references()
  for spec in list(cfg.data.sources.values()) + [cfg.data.text_source, cfg.data.math_source]:
    for key in ("path", "image_root"):
      if key in spec:
        spec[key] = _expand(spec[key], workdir)
  for key in ("params", "cnn"):
    value = _expand(cfg.init[key], workdir)
    if value == "previous":
      if previous_dir is None:
        raise ValueError(f"stage {cfg.stage!r}: init.{key}='previous' but it is the first stage of the run")
      value = previous_dir
    cfg.init[key] = value
  if not cfg.init.params:
    raise ValueError(f"stage {cfg.stage!r}: set --config.init.params (a model folder from convert/hf_to_jax.py, "
                     "the previous stage's workdir, or 'random')")
  return cfg


def run(cfg, workdir: str, *, log: Callable[[str], None] = print, progress: bool = True) -> dict[str, Any]:
  """Runs every stage of `cfg` in order under `workdir`; with `cfg.demo`, evaluates afterwards."""
  start = time.perf_counter()
  os.makedirs(workdir, exist_ok=True)
  demo_cfg = cfg.get("demo")
  pretrained = None
  if demo_cfg is not None:
    from tinyvlm_jax.train import demo  # pylint: disable=g-import-not-at-top
    data_dir = _expand(demo_cfg.data_dir, workdir)
    demo.prepare_data(data_dir, num_train=demo_cfg.num_train, num_test=demo_cfg.num_test,
                      image_size=demo_cfg.image_size, seed=demo_cfg.seed, log=log)
    if demo_cfg.get("vision_pretrain") is not None:  # the tower the first stage starts from
      pretrained = demo.pretrain_vision(demo_cfg.vision_pretrain.to_dict(), data_dir, workdir,
                                        model_config(stage_list(cfg)[0].model), log=log)
  previous = None
  results = []
  stage_cfg = None
  for stage_cfg in stage_list(cfg):
    stage_cfg = prepare_stage(stage_cfg, workdir, previous)
    results.append(train_stage(stage_cfg, workdir, log=log, progress=progress))
    previous = results[-1].stage_dir
  summary: dict[str, Any] = {"stages": {r.stage: {"steps": r.steps, "seconds": round(r.seconds, 1)} for r in results}}
  if pretrained is not None:
    summary["vision_pretrain"] = {k: v for k, v in pretrained.items() if k != "tags"}
  if len(results) > 1 and jax.process_index() == 0:
    curves = [(r.stage, metrics_lib.read_metrics(os.path.join(r.stage_dir, metrics_lib.METRICS_FILE)))
              for r in results]
    summary["loss_curve"] = metrics_lib.plot_loss_curves(curves, os.path.join(workdir, metrics_lib.CURVE_FILE))
  if demo_cfg is not None:
    last = results[-1]
    evaluation = demo.evaluate(os.path.join(data_dir, "test.json"), last.params,
                               last.model_config, max_new_tokens=demo_cfg.max_new_tokens,
                               batch_size=demo_cfg.eval_batch_size,
                               tokenizer_path=stage_cfg.data.tokenizer_path or None)  # the data's tokenizer
    summary.update(evaluation)
    summary["seconds"] = round(time.perf_counter() - start, 1)
    if jax.process_index() == 0:
      path = os.path.join(workdir, demo.RESULTS_FILE)
      with open(path, "w") as f:
        json.dump({"accuracy": summary["accuracy"], "per_type": summary["per_type"], "seconds": summary["seconds"],
                   **{k: v for k, v in summary.items() if k not in ("accuracy", "per_type", "seconds")}}, f, indent=1)
      log(f"demo: exact-match accuracy {summary['accuracy']:.3f} on {summary['num_examples']} held-out questions "
          f"{summary['per_type']}; {summary['seconds']:.0f} s in all; {path}")
  summary.setdefault("seconds", round(time.perf_counter() - start, 1))
  return summary
