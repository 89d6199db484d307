"""Table-driven conversion between Flax parameter trees and transformers state dicts.

Each tower has one table (a list of `Rule`) that names a Flax parameter, the matching
transformers key and the transform between the two layouts. The same table is used in
both directions, so import and export can never disagree (MaxText's param_mapping).
Everything here works on numpy arrays; transposes of float arrays are exact, so a round
trip is bit-identical.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Mapping

import numpy as np


class CheckpointMismatchError(ValueError):
  """A checkpoint does not fit the model: missing, unexpected or wrongly shaped keys."""


@dataclasses.dataclass(frozen=True)
class Rule:
  flax: tuple[str, ...]  # path in the Flax params tree (without the top-level "params")
  hf: str                # key in the transformers state dict
  transform: str = "identity"


def _t(x):
  return np.ascontiguousarray(np.swapaxes(x, -1, -2))


# name -> (hf_to_flax, flax_to_hf)
TRANSFORMS: dict[str, tuple[Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray]]] = {
    "identity": (lambda x: x, lambda x: x),
    # torch Linear weight [out, in] <-> Flax Dense kernel [in, out]
    "linear": (_t, _t),
    # torch Conv2d weight [O, I, H, W] <-> Flax Conv kernel [H, W, I, O]
    "conv2d": (lambda x: np.ascontiguousarray(x.transpose(2, 3, 1, 0)),
               lambda x: np.ascontiguousarray(x.transpose(3, 2, 0, 1))),
}


def _get(tree: Mapping[str, Any], path: tuple[str, ...]):
  node = tree
  for p in path:
    node = node[p]
  return node


def _set(tree: dict, path: tuple[str, ...], value) -> None:
  node = tree
  for p in path[:-1]:
    node = node.setdefault(p, {})
  node[path[-1]] = value


def flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
  """Nested dict -> {path tuple: leaf}."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(flatten(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def flax_from_hf(state: Mapping[str, np.ndarray], table: Iterable[Rule], *, prefix: str = "",
                 expected: Mapping[str, Any] | None = None, ignore: Iterable[str] = (),
                 source: str = "checkpoint") -> dict:
  """transformers state dict -> nested Flax params.

  `prefix` is prepended to every HF key of the table (e.g. "vision_model."). Keys of
  `state` under `prefix` that the table does not name are unexpected unless listed in
  `ignore`; table keys absent from `state` are missing. With `expected` (a params tree of
  arrays or ShapeDtypeStructs, e.g. from `jax.eval_shape(model.init, ...)`), every
  converted array is checked against its shape and dtype is taken from it.
  """
  table = list(table)
  wanted = {prefix + r.hf for r in table}
  missing = sorted(k for k in wanted if k not in state)
  ignored = {prefix + k for k in ignore}
  unexpected = sorted(k for k in state if k.startswith(prefix) and k not in wanted and k not in ignored)
  problems = []
  if missing:
    problems.append(f"missing key(s) {missing[:8]}{' ...' if len(missing) > 8 else ''} ({len(missing)} in all)")
  if unexpected:
    problems.append(f"unexpected key(s) {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''} ({len(unexpected)} in all)")
  if problems:
    raise CheckpointMismatchError(f"{source}: " + "; ".join(problems))
  params: dict = {}
  for rule in table:
    key = prefix + rule.hf
    value = TRANSFORMS[rule.transform][0](np.asarray(state[key]))
    if expected is not None:
      try:
        want = _get(expected, rule.flax)
      except KeyError:
        raise CheckpointMismatchError(f"{source}: key {key!r} maps to Flax parameter "
                                      f"{'/'.join(rule.flax)!r}, which the model does not have") from None
      if tuple(want.shape) != tuple(value.shape):
        hf_shape = tuple(np.asarray(state[key]).shape)
        want_hf = tuple(TRANSFORMS[rule.transform][1](np.empty(want.shape, np.int8)).shape)
        raise CheckpointMismatchError(f"{source}: key {key!r} has shape {hf_shape}, expected {want_hf}")
    _set(params, rule.flax, value)
  if expected is not None:
    absent = sorted("/".join(p) for p in flatten(expected) if p not in {r.flax for r in table})
    if absent:
      raise CheckpointMismatchError(f"{source}: the table leaves Flax parameter(s) {absent[:8]} without a source")
  return params


def hf_from_flax(params: Mapping[str, Any], table: Iterable[Rule], *, prefix: str = "") -> dict[str, np.ndarray]:
  """Nested Flax params -> transformers state dict (numpy), keys prefixed with `prefix`."""
  out = {}
  for rule in table:
    try:
      value = np.asarray(_get(params, rule.flax))
    except KeyError:
      raise CheckpointMismatchError(f"Flax parameter {'/'.join(rule.flax)!r} (for {prefix + rule.hf!r}) "
                                    "is missing from the params tree") from None
    out[prefix + rule.hf] = TRANSFORMS[rule.transform][1](value)
  return out


# ---------------------------------------------------------------------------------------
# Reading state dicts from torch modules and checkpoint folders.


def torch_to_numpy(t) -> np.ndarray:
  """torch tensor -> numpy without a float cast (bf16 becomes ml_dtypes.bfloat16)."""
  import torch
  t = t.detach().cpu()
  if t.dtype == torch.bfloat16:
    import ml_dtypes
    return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  return t.numpy()


def numpy_to_torch(x: np.ndarray):
  """numpy -> torch tensor without a float cast (ml_dtypes.bfloat16 becomes torch.bfloat16)."""
  import ml_dtypes
  import torch
  x = np.ascontiguousarray(x)
  if x.dtype == ml_dtypes.bfloat16:
    return torch.from_numpy(x.view(np.int16)).view(torch.bfloat16)
  return torch.from_numpy(x)


def state_dict_of(source) -> dict[str, np.ndarray]:
  """A torch module, a state dict (torch or numpy values) or a checkpoint folder/file -> numpy state dict."""
  import os
  if isinstance(source, (str, os.PathLike)):
    return load_state_dict(source)
  if hasattr(source, "state_dict"):
    source = source.state_dict()
  return {k: (v if isinstance(v, np.ndarray) else torch_to_numpy(v)) for k, v in source.items()}


def load_state_dict(path) -> dict[str, np.ndarray]:
  """Reads a transformers checkpoint: a folder (safetensors, sharded with an index, or
  pytorch_model.bin) or one file. `.bin` goes through `torch.load(weights_only=True)` only."""
  import json
  import os
  path = os.fspath(path)
  if os.path.isdir(path):
    names = sorted(os.listdir(path))
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
      if index_name in names:
        with open(os.path.join(path, index_name)) as f:
          shards = sorted(set(json.load(f)["weight_map"].values()))
        out = {}
        for shard in shards:
          out.update(load_state_dict(os.path.join(path, shard)))
        return out
    for single in ("model.safetensors", "pytorch_model.bin"):
      if single in names:
        return load_state_dict(os.path.join(path, single))
    weights = [n for n in names if n.endswith(".safetensors")]
    if len(weights) == 1:
      return load_state_dict(os.path.join(path, weights[0]))
    raise CheckpointMismatchError(
        f"{path}: no weights found (expected model.safetensors, a sharded model.safetensors.index.json, "
        f"or pytorch_model.bin); the folder holds {names[:12]}")
  if not os.path.exists(path):
    raise CheckpointMismatchError(f"{path}: no such file or folder")
  if path.endswith(".safetensors"):
    from safetensors import safe_open
    out = {}
    with safe_open(path, framework="pt") as f:
      for k in f.keys():
        out[k] = torch_to_numpy(f.get_tensor(k))
    return out
  if path.endswith((".bin", ".pt", ".pth")):
    import torch
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {k: torch_to_numpy(v) for k, v in state.items()}
  raise CheckpointMismatchError(f"{path}: unknown weight file type (expected .safetensors or .bin)")
