"""Trains TinyVLM: one stage of the paper (configs/stage{1,2,3}.py) or the CPU demo (configs/demo.py).

  python launch/train.py                                  # the demo, all three stages, into ./workdir/demo
  python launch/train.py --config configs/stage2.py --workdir DIR [--config.FIELD=VALUE ...]

A workdir that holds a checkpoint resumes from it. Multi-host: on a Cloud TPU pod slice
jax.distributed is initialised automatically; elsewhere pass --coordinator_address,
--num_processes and --process_id (the same command on every host).
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
  sys.path.insert(0, _REPO)

DEMO_CONFIG = os.path.join(_REPO, "configs", "demo.py")
DEMO_WORKDIR = os.path.join("workdir", "demo")

_CONFIG = config_flags.DEFINE_config_file("config", DEMO_CONFIG, "training config file (configs/*.py)",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, f"output folder (default for the demo: ./{DEMO_WORKDIR})")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for multi-host runs")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "number of processes (hosts) in a multi-host run")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "this process's index in a multi-host run")
_DISTRIBUTED = flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                                 "jax.distributed.initialize(): auto = with coordinator flags or on a multi-host "
                                 "TPU/SLURM/MPI job")
_PROGRESS = flags.DEFINE_bool("progress", True, "show a progress bar")


def _multi_host_environment() -> bool:
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  if len([h for h in hosts.split(",") if h]) > 1:
    return True
  for var in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
    if int(os.environ.get(var, "1") or 1) > 1:
      return True
  return False


def _init_distributed() -> None:
  import jax  # pylint: disable=g-import-not-at-top
  given = _COORDINATOR.value is not None
  if _DISTRIBUTED.value == "off" or (_DISTRIBUTED.value == "auto" and not given and not _multi_host_environment()):
    return
  if given and (_NUM_PROCESSES.value is None or _PROCESS_ID.value is None):
    raise app.UsageError("--coordinator_address needs --num_processes and --process_id")
  if os.environ.get("JAX_PLATFORMS", "") == "cpu" or (given and jax.config.jax_platforms == "cpu"):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  kwargs = {}
  if given:
    kwargs = dict(coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
                  process_id=_PROCESS_ID.value)
  jax.distributed.initialize(**kwargs)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}; config fields are set with --config.FIELD=VALUE")
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  _init_distributed()
  import jax  # pylint: disable=g-import-not-at-top
  from tinyvlm_jax.train import loop  # pylint: disable=g-import-not-at-top

  workdir = _WORKDIR.value
  if workdir is None:
    if os.path.abspath(flags.FLAGS["config"].config_filename) != DEMO_CONFIG:
      raise app.UsageError("--workdir is required (only the demo has a default workdir)")
    workdir = DEMO_WORKDIR
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  log_path = os.path.join(workdir, "train.log")

  def log(message: str) -> None:
    if jax.process_index() != 0:
      return
    print(message, flush=True)
    with open(log_path, "a") as f:
      f.write(message + "\n")

  log(f"workdir {workdir}; config {flags.FLAGS['config'].config_filename}")
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(_CONFIG.value.to_json_best_effort(indent=1))
  try:
    loop.run(_CONFIG.value, workdir, log=log, progress=_PROGRESS.value)
  except loop.Preempted as e:
    log(str(e))
    return 0
  except loop.NonFiniteLoss as e:
    log(f"ERROR: {e}")
    sys.exit(3)
  return 0


if __name__ == "__main__":
  app.run(main)
