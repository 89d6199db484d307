"""Whole-TinyVLM mapping: our Flax params <-> one PyTorch state dict, and the export folder on disk.

The state dict is the three backbone tables, each under its own prefix, plus one table for
the heads (the names of `tinyvlm_jax.torch_model.TinyVLMTorch`):

  vision_model.*    transformers `SiglipVisionModel` keys (strip the prefix for transformers 5.x,
                    whose SiglipVisionModel state dict has no "vision_model." level; transformers
                    4.x and the vision half of a `SiglipModel` use the prefixed keys as they are)
  language_model.*  `Qwen2ForCausalLM` keys ("model.layers.0...", no lm_head when tied)
  cnn.*             `ConvNextV2Model` keys
  pooler.conv.{weight,bias}                 Conv2d(D, D, 2, stride 2)
  connector.fc1|fc2.{weight,bias}           Linear, GELU, Linear
  fuser.q_proj|kv_proj.{weight,bias}        Linear (the sin-cos PE is fixed, not stored)

so `{k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}` loads strictly into
the backbone alone. Export folder: `config.json` (`hf_config_dict`), `model.safetensors` (or
shards with `model.safetensors.index.json`) and the tokenizer files.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterator, Mapping

import numpy as np

from tinyvlm_jax.convert import convnext, qwen2, siglip
from tinyvlm_jax.convert.mapping import (TRANSFORMS, CheckpointMismatchError, Rule, flatten,
                                         load_state_dict)
from tinyvlm_jax.models.config import TinyVLMConfig

VISION_PREFIX = "vision_model."
LLM_PREFIX = "language_model."
CNN_PREFIX = "cnn."
ARCHITECTURE = "TinyVLMForConditionalGeneration"
MODEL_TYPE = "tinyvlm"
EXPORT_VERSION = 1
SAFETENSORS_INDEX = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 2 * 1024 ** 3
DTYPES = ("float32", "bfloat16")


class ArchitectureMismatchError(CheckpointMismatchError):
  """A config describes another architecture than the one asked for; the message names the field."""


def _prefixed(table: list[Rule], flax_root: str, prefix: str) -> list[Rule]:
  return [Rule((flax_root,) + r.flax, prefix + r.hf, r.transform) for r in table]


def head_table(config: TinyVLMConfig) -> list[Rule]:
  """The three heads: Flax path <-> TinyVLMTorch key."""
  linear = lambda flax, hf: [Rule(flax + ("kernel",), hf + ".weight", "linear"), Rule(flax + ("bias",), hf + ".bias")]
  rules = []
  if config.pooler == "conv":
    rules += [Rule(("pooler", "conv", "kernel"), "pooler.conv.weight", "conv2d"),
              Rule(("pooler", "conv", "bias"), "pooler.conv.bias")]
  rules += linear(("connector", "fc1"), "connector.fc1") + linear(("connector", "fc2"), "connector.fc2")
  if config.use_cnn:
    rules += linear(("fuser", "q_proj"), "fuser.q_proj") + linear(("fuser", "kv_proj"), "fuser.kv_proj")
  return rules


def param_table(config: TinyVLMConfig) -> list[Rule]:
  """Every parameter of `TinyVLM(config)` (paths from the top of the params tree) and its export key."""
  rules = _prefixed(siglip.param_table(config.vision), "vision", VISION_PREFIX)
  rules += _prefixed(qwen2.param_table(config.llm), "llm", LLM_PREFIX)
  if config.use_cnn:
    rules += _prefixed(convnext.param_table(config.cnn), "cnn", CNN_PREFIX)
  return rules + head_table(config)


# Keys TinyVLMTorch.state_dict() may hold that the export leaves out: the tied LM head.
def _tied_head_key(config: TinyVLMConfig) -> str | None:
  return LLM_PREFIX + qwen2.LM_HEAD if config.llm.tie_word_embeddings else None


def _cast(x: np.ndarray, dtype: str | None) -> np.ndarray:
  if dtype is None or x.dtype == np.dtype(_np_dtype(dtype)):
    return x
  return x.astype(_np_dtype(dtype))


def _np_dtype(dtype: str):
  if dtype not in DTYPES:
    raise ValueError(f"dtype {dtype!r} not supported; expected one of {DTYPES}")
  if dtype == "bfloat16":
    import ml_dtypes
    return ml_dtypes.bfloat16
  return np.float32


def _pop(tree: dict, path: tuple[str, ...]):
  node = tree
  for p in path[:-1]:
    node = node[p]
  return node.pop(path[-1])


def _get(tree: Mapping[str, Any], path: tuple[str, ...]):
  node = tree
  for p in path:
    node = node[p]
  return node


def _export_items(params: dict, rules: list[Rule], dtype: str | None, consume: bool) -> Iterator[tuple[str, np.ndarray]]:
  for rule in rules:
    try:
      value = _pop(params, rule.flax) if consume else _get(params, rule.flax)
    except KeyError:
      raise CheckpointMismatchError(f"params: Flax parameter {'/'.join(rule.flax)!r} (for {rule.hf!r}) "
                                    "is missing") from None
    yield rule.hf, _cast(TRANSFORMS[rule.transform][1](np.asarray(value)), dtype)


def _strip(params):
  return params["params"] if set(params) == {"params"} else params


def export_state(params: Mapping[str, Any], config: TinyVLMConfig, dtype: str | None = None) -> dict[str, np.ndarray]:
  """TinyVLM params tree -> PyTorch state dict (numpy; `dtype` float32 or bfloat16, default as stored)."""
  params = _strip(params)
  rules = param_table(config)
  extra = sorted("/".join(p) for p in set(flatten(params)) - {r.flax for r in rules})
  if extra:
    raise CheckpointMismatchError(f"params: parameter(s) {extra[:8]} have no export key for this config")
  return dict(_export_items(params, rules, dtype, consume=False))


def _hf_shape(shape: tuple[int, ...], transform: str) -> tuple[int, ...]:
  """The torch-side shape of a Flax parameter of `shape` (a zero-byte dtype: nothing is allocated)."""
  return tuple(TRANSFORMS[transform][1](np.empty(shape, np.dtype([]))).shape)


def import_state(state: dict, config: TinyVLMConfig, *, source: str = "checkpoint", consume: bool = False) -> dict:
  """PyTorch state dict (numpy or torch values) -> TinyVLM params tree of float32 numpy arrays.

  Strict: a missing, unexpected or wrongly shaped key raises CheckpointMismatchError naming the
  key and both shapes. A tied `language_model.lm_head.weight` (as `TinyVLMTorch.state_dict()`
  lists it) is accepted when it equals the embedding. With `consume`, entries are removed from
  `state` as they are converted, so the two copies never coexist (half the peak memory).
  """
  from tinyvlm_jax.convert.mapping import torch_to_numpy
  from tinyvlm_jax.models.tinyvlm import param_shapes
  rules = param_table(config)
  wanted = {r.hf for r in rules}
  ignore = set()
  tied = _tied_head_key(config)
  if tied is not None and tied in state:
    embed_key = LLM_PREFIX + qwen2.EMBED
    if embed_key in state and not np.array_equal(np.asarray(state[tied]), np.asarray(state[embed_key])):
      raise CheckpointMismatchError(f"{source}: key {tied!r} differs from {embed_key!r}, but the config ties the "
                                    "embeddings (llm.tie_word_embeddings=True)")
    ignore.add(tied)
  missing = sorted(wanted - set(state))
  unexpected = sorted(set(state) - wanted - ignore)
  problems = []
  if missing:
    problems.append(f"missing key(s) {missing[:8]}{' ...' if len(missing) > 8 else ''} ({len(missing)} in all)")
  if unexpected:
    problems.append(f"unexpected key(s) {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''} "
                    f"({len(unexpected)} in all)")
  if problems:
    raise CheckpointMismatchError(f"{source}: " + "; ".join(problems))
  expected = param_shapes(config)
  covered = {r.flax for r in rules}
  absent = sorted("/".join(p) for p in flatten(expected) if p not in covered)
  if absent:
    raise CheckpointMismatchError(f"{source}: the conversion table leaves parameter(s) {absent[:8]} without a key")
  # Shapes first, so a bad checkpoint fails before any work.
  for rule in rules:
    want = _hf_shape(tuple(_get(expected, rule.flax).shape), rule.transform)
    have = tuple(state[rule.hf].shape)
    if have != want:
      raise CheckpointMismatchError(f"{source}: key {rule.hf!r} has shape {have}, expected {want}")
  params: dict = {}
  for rule in rules:
    value = state.pop(rule.hf) if consume else state[rule.hf]
    if not isinstance(value, np.ndarray):
      value = torch_to_numpy(value)
    value = np.asarray(TRANSFORMS[rule.transform][0](value), np.dtype(_get(expected, rule.flax).dtype))
    node = params
    for p in rule.flax[:-1]:
      node = node.setdefault(p, {})
    node[rule.flax[-1]] = value
  return params


def hf_config_dict(config: TinyVLMConfig, dtype: str = "float32") -> dict:
  """config.json of an export: the architecture, our TinyVLMConfig, and each backbone's transformers
  config (so `SiglipVisionConfig(**d["vision_config"])` etc. rebuild each backbone alone)."""
  _np_dtype(dtype)
  backbones = {
      "vision_config": (VISION_PREFIX, "SiglipVisionModel", siglip.to_hf_config(config.vision)),
      "text_config": (LLM_PREFIX, "Qwen2ForCausalLM", qwen2.to_hf_config(config.llm)),
  }
  if config.use_cnn:
    backbones["cnn_config"] = (CNN_PREFIX, "ConvNextV2Model", convnext.to_hf_config(config.cnn))
  out = {"architectures": [ARCHITECTURE], "model_type": MODEL_TYPE, "format_version": EXPORT_VERSION,
         "dtype": dtype, "image_token_id": config.image_token_id, "tinyvlm_config": config.to_dict()}
  out["backbones"] = {name: {"prefix": prefix, "class": cls} for name, (prefix, cls, _) in backbones.items()}
  for name, (_, cls, hf_config) in backbones.items():
    d = hf_config.to_dict()
    d["architectures"] = [cls]
    d["dtype"] = dtype
    out[name] = d
  return out


def config_from_hf_dict(d: Mapping[str, Any], source: str = "config.json") -> TinyVLMConfig:
  """An export's config.json (as a dict) -> TinyVLMConfig, refusing other architectures by name."""
  if d.get("model_type") != MODEL_TYPE:
    raise ArchitectureMismatchError(
        f"{source}: model_type is {d.get('model_type')!r} (architectures {d.get('architectures')}), expected "
        f"{MODEL_TYPE!r}: not a TinyVLM export")
  if d.get("format_version", 0) > EXPORT_VERSION:
    raise ArchitectureMismatchError(f"{source}: format_version {d['format_version']} is newer than this code "
                                    f"reads ({EXPORT_VERSION})")
  try:
    return TinyVLMConfig.from_dict(d["tinyvlm_config"])
  except (KeyError, TypeError, ValueError) as e:
    raise ArchitectureMismatchError(f"{source}: bad \"tinyvlm_config\": {e}") from None


def read_export_config(folder) -> TinyVLMConfig:
  folder = os.fspath(folder)
  path = os.path.join(folder, "config.json")
  if not os.path.isfile(path):
    raise CheckpointMismatchError(f"{folder}: no config.json; not a TinyVLM export "
                                  "(make one with convert/jax_to_torch.py)")
  with open(path) as f:
    try:
      d = json.load(f)
    except json.JSONDecodeError as e:
      raise CheckpointMismatchError(f"{path}: not valid JSON: {e}") from None
  return config_from_hf_dict(d, path)


def _shard_plan(rules: list[Rule], sizes: list[int], max_shard_bytes: int) -> list[list[int]]:
  """Rule indices grouped into shards of at most `max_shard_bytes` (one tensor may exceed it alone)."""
  shards, current, used = [], [], 0
  for i, size in enumerate(sizes):
    if current and used + size > max_shard_bytes:
      shards.append(current)
      current, used = [], 0
    current.append(i)
    used += size
  if current:
    shards.append(current)
  return shards


def save_export(out_dir, params: dict, config: TinyVLMConfig, *, dtype: str = "float32",
                max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, tokenizer_src=None,
                consume: bool = False) -> list[str]:
  """Writes a PyTorch export: config.json, safetensors (sharded with an index above
  `max_shard_bytes`) and the tokenizer files of `tokenizer_src`. Returns the weight files.

  Tensors are converted and written one shard at a time; with `consume` each parameter is
  dropped from `params` once converted, so peak memory stays near the model size.
  """
  from safetensors.numpy import save_file
  from tinyvlm_jax import model_io
  params = _strip(params)
  np_dtype = np.dtype(_np_dtype(dtype))
  rules = param_table(config)
  extra = sorted("/".join(p) for p in set(flatten(params)) - {r.flax for r in rules})
  if extra:
    raise CheckpointMismatchError(f"params: parameter(s) {extra[:8]} have no export key for this config")
  sizes = []
  for r in rules:
    try:
      sizes.append(int(np.prod(_get(params, r.flax).shape)) * np_dtype.itemsize)
    except KeyError:
      raise CheckpointMismatchError(f"params: Flax parameter {'/'.join(r.flax)!r} (for {r.hf!r}) is missing") from None
  plan = _shard_plan(rules, sizes, max_shard_bytes)
  out = os.fspath(out_dir)
  os.makedirs(out, exist_ok=True)
  names = (["model.safetensors"] if len(plan) == 1 else
           [f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors" for i in range(len(plan))])
  weight_map = {}
  for name, indices in zip(names, plan):
    shard = dict(_export_items(params, [rules[i] for i in indices], dtype, consume))
    save_file(shard, os.path.join(out, name), metadata={"format": "pt"})
    weight_map.update({k: name for k in shard})
    del shard
  if len(plan) > 1:
    with open(os.path.join(out, SAFETENSORS_INDEX), "w") as f:
      json.dump({"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}, f, indent=2)
  with open(os.path.join(out, "config.json"), "w") as f:
    json.dump(hf_config_dict(config, dtype), f, indent=2)
  if tokenizer_src is not None and model_io.tokenizer_files(tokenizer_src):
    model_io.copy_tokenizer(tokenizer_src, out)
  return names


def load_export(folder) -> tuple[TinyVLMConfig, dict]:
  """A PyTorch export folder -> (config, float32 params tree), strictly checked."""
  config = read_export_config(folder)
  state = load_state_dict(folder)
  return config, import_state(state, config, source=os.fspath(folder), consume=True)


# ---------------------------------------------------------------------------------------
# From the backbones' own transformers checkpoint folders (convert/hf_to_jax.py).

# kind -> (accepted model_type values, anchor key to find the backbone's prefix, module, flax root)
_BACKBONES = {
    "siglip": (("siglip_vision_model", "siglip"), "embeddings.patch_embedding.weight", siglip, "vision"),
    "qwen": (("qwen2",), qwen2.EMBED, qwen2, "llm"),
    "convnext": (("convnextv2",), "embeddings.patch_embeddings.weight", convnext, "cnn"),
}
_CONFIG_FIELD = {"siglip": "vision", "qwen": "llm", "convnext": "cnn"}
# Our config's runtime fields, absent from transformers configs, and the init scale (no bearing on a checkpoint).
_NOT_ARCHITECTURE = ("dtype", "remat", "initializer_range", "matmul_dtype")


def backbone_config(folder, kind: str, want, preset: str = "preset"):
  """Reads a backbone folder's config.json and checks it against `want` (our config for that tower).

  Raises ArchitectureMismatchError naming the field and both values.
  """
  import dataclasses
  import transformers
  folder = os.fspath(folder)
  model_types, _, module, _ = _BACKBONES[kind]
  path = os.path.join(folder, "config.json")
  if not os.path.isfile(path):
    raise CheckpointMismatchError(f"{folder}: no config.json (expected a transformers checkpoint folder)")
  try:
    with open(path) as f:
      model_type = json.load(f).get("model_type")
  except (OSError, ValueError) as e:
    raise CheckpointMismatchError(f"{path}: unreadable: {e}") from None
  if model_type not in model_types:
    raise ArchitectureMismatchError(f"{path}: model_type is {model_type!r}, expected {' or '.join(map(repr, model_types))} "
                                    f"for --{kind}")
  try:
    hf_config = transformers.AutoConfig.from_pretrained(folder)
    found = module.config_from_hf(hf_config)
  except ValueError as e:
    raise ArchitectureMismatchError(f"{path}: {e}") from None
  for field in dataclasses.fields(want):
    if field.name in _NOT_ARCHITECTURE:
      continue
    a, b = getattr(found, field.name), getattr(want, field.name)
    if a != b:
      raise ArchitectureMismatchError(f"{path}: {field.name} is {a!r}, but {preset} has {field.name}={b!r}")
  return found


def backbone_params(folder, kind: str, cfg) -> dict:
  """One backbone's params from its transformers checkpoint folder (the key prefix is found, e.g.
  "vision_model." for a whole `SiglipModel`, "convnextv2." for `ConvNextV2ForImageClassification`)."""
  _, anchor, module, _ = _BACKBONES[kind]
  state = load_state_dict(folder)
  prefixes = sorted({k[:-len(anchor)] for k in state if k.endswith(anchor)}, key=len)
  # Keys outside the prefix (a SiglipModel's text tower, a classifier head) are not looked at.
  return module.params_from_hf(state, cfg, prefix=prefixes[0] if prefixes else "")


def fresh_heads(config: TinyVLMConfig, seed: int) -> dict:
  """The heads exactly as `init_params(config, PRNGKey(seed))` makes them (pooler = 2x2 average),
  without allocating the backbones (jit drops their unused initialisers)."""
  import jax
  from tinyvlm_jax.models.tinyvlm import init_params
  names = {"pooler", "connector", "fuser"}
  heads = jax.jit(lambda key: {n: v for n, v in init_params(config, key).items() if n in names})
  return jax.tree.map(np.asarray, heads(jax.random.PRNGKey(seed)))


def params_from_hf_folders(config: TinyVLMConfig, *, siglip_dir, qwen_dir, convnext_dir=None,
                           seed: int = 0, preset: str = "preset") -> dict:
  """TinyVLM params from the backbones' transformers folders, heads fresh (DESIGN 2: stage-1 start)."""
  dirs = {"siglip": siglip_dir, "qwen": qwen_dir, "convnext": convnext_dir}
  if config.use_cnn and convnext_dir is None:
    raise CheckpointMismatchError(f"{preset} uses the CNN branch (use_cnn=True): pass --convnext DIR")
  if not config.use_cnn and convnext_dir is not None:
    raise ArchitectureMismatchError(f"{preset} has no CNN branch (use_cnn=False), but --convnext was given")
  params = {}
  for kind, folder in dirs.items():
    if folder is None:
      continue
    cfg = getattr(config, _CONFIG_FIELD[kind])
    backbone_config(folder, kind, cfg, preset)
    params[_BACKBONES[kind][3]] = backbone_params(folder, kind, cfg)
  params.update(fresh_heads(config, seed))
  return params
