"""Finding and loading a model for inference: model folders inside training workdirs, tokenizers."""

from __future__ import annotations

import json
import os

from tinyvlm_jax.model_io import CONFIG_FILE, FORMAT, TOKENIZER_DIR, ModelFolderError


def _is_model_dir(path: str) -> bool:
  try:
    with open(os.path.join(path, CONFIG_FILE)) as f:
      return json.load(f).get("format") == FORMAT
  except (OSError, ValueError, AttributeError):
    return False


def find_model_dir(path: str) -> str:
  """A model folder, or the newest model folder inside a training workdir (searched 3 levels deep)."""
  path = os.path.abspath(os.fspath(path))
  if not os.path.isdir(path):
    raise ModelFolderError(f"{path}: no such checkpoint folder")
  if _is_model_dir(path):
    return path
  found = []
  for root, dirs, _ in os.walk(path):
    if root[len(path):].count(os.sep) >= 3:
      dirs[:] = []
      continue
    if root != path and _is_model_dir(root):
      found.append(root)
      dirs[:] = []
  if not found:
    raise ModelFolderError(f"{path}: holds no TinyVLM model folder (a folder with a {CONFIG_FILE} of format "
                           f"{FORMAT!r}); pass the output of launch/train.py or convert/hf_to_jax.py")
  return max(found, key=lambda d: os.path.getmtime(os.path.join(d, CONFIG_FILE)))


def load_model_tokenizer(model_dir: str):
  """The model folder's own tokenizer when it has one, else the offline Qwen2.5 default."""
  from tinyvlm_jax.data.tokenizer import load_tokenizer
  tok_dir = os.path.join(model_dir, TOKENIZER_DIR)
  return load_tokenizer(tok_dir if os.path.isdir(tok_dir) and os.listdir(tok_dir) else None)


def with_matmul_dtype(config, matmul_dtype: str):
  """The TinyVLM config with `matmul_dtype` (float32 | bfloat16) for its vision tower and LLM, which
  do nearly all of a prompt's FLOPs: see `cpu_kernels.matmul_dot_general`. The CNN and the heads
  stay float32."""
  import dataclasses
  from tinyvlm_jax.cpu_kernels import check_matmul_dtype
  check_matmul_dtype(matmul_dtype)
  return dataclasses.replace(config, vision=dataclasses.replace(config.vision, matmul_dtype=matmul_dtype),
                             llm=dataclasses.replace(config.llm, matmul_dtype=matmul_dtype))


def load_for_inference(model_dir: str, quantize: str = "none", matmul_dtype: str = "float32"):
  """(config, params) of a model folder, weight-quantized (`tinyvlm_jax.quantize`: none, int8, int4),
  with `matmul_dtype` for the prompt's matmuls (`with_matmul_dtype`), and placed on the default
  device once (not converted from numpy at every call)."""
  import logging
  import jax
  from tinyvlm_jax.cpu_kernels import bfloat16_matmuls_are_fast, check_matmul_dtype
  from tinyvlm_jax.model_io import load_model
  from tinyvlm_jax.quantize import parse_mode, quantize_params, quantized_config
  parse_mode(quantize)  # a bad mode or dtype fails before the weights are read
  check_matmul_dtype(matmul_dtype)
  if matmul_dtype == "bfloat16" and not bfloat16_matmuls_are_fast():
    logging.getLogger(__name__).warning(
        "matmul_dtype bfloat16: this CPU has no AVX512-BF16 or AMX-BF16, so XLA converts bfloat16 "
        "products and they may run slower than float32")
  config, params = load_model(model_dir)
  params = quantize_params(params, config, quantize)
  return with_matmul_dtype(quantized_config(config, quantize), matmul_dtype), jax.device_put(params)
