"""Test setup: CPU, fp32, deterministic; a compilation cache shared by the whole session."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Many tests build the same programs (the tiny preset's init alone compiles for ~7 s) in fresh jit
# wrappers, and the CLI tests in fresh processes. A persistent compilation cache in a new folder
# for this session (inherited by the subprocesses through the environment) compiles each program
# once; every run still starts empty, so nothing is carried over from an earlier checkout.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache = tempfile.mkdtemp(prefix="tinyvlm_test_jax_cache_")
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

# The tests compile many small programs and run each a few times: compile with the options that
# test subprocesses and init_params use (tinyvlm_jax.models.tinyvlm.FAST_COMPILE: optimisation
# level 0, no fusion emitters), set before jax creates its CPU backend. The tiny preset's gradient
# program compiles in 13 s instead of 35 s. test_vision_pretrain trains at this level too: it
# caught jnp.max's gradient turning NaN there.
from tinyvlm_jax.train.testing import FAST_COMPILE_FLAGS  # noqa: E402

os.environ.setdefault("XLA_FLAGS", FAST_COMPILE_FLAGS)

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
