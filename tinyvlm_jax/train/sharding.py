"""Device mesh and parameter shardings from the config (big_vision style: regex rules).

The mesh has named axes (`data`, `fsdp`, `tensor`); one size may be -1 ("the rest of the
devices"). Parameters are matched by their path (`llm/layers_3/mlp/up_proj/kernel`)
against an ordered list of `(regex, spec)` rules; the first full match wins. A spec is
either a tuple with one entry per dimension (an axis name, a tuple of names, or None)
or the string "fsdp": shard the largest dimension that divides evenly over the `fsdp`
axis. A dimension that does not divide by its axes is replicated instead.
"""

from __future__ import annotations

import math
import re
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the batch dimension is split over both


def mesh_shape(axis_sizes: dict[str, int], num_devices: int) -> tuple[int, ...]:
  """{data: -1, fsdp: 4, tensor: 1} with 8 devices -> (2, 4, 1)."""
  unknown = sorted(set(axis_sizes) - set(MESH_AXES))
  if unknown:
    raise ValueError(f"mesh: unknown axis name(s) {unknown}; the mesh axes are {list(MESH_AXES)}")
  sizes = [int(axis_sizes.get(a, 1)) for a in MESH_AXES]
  free = [i for i, s in enumerate(sizes) if s == -1]
  if len(free) > 1:
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))}: at most one axis may be -1")
  fixed = math.prod(s for s in sizes if s != -1)
  if any(s == 0 or s < -1 for s in sizes) or num_devices % fixed:
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} does not fit {num_devices} devices")
  if free:
    sizes[free[0]] = num_devices // fixed
  if math.prod(sizes) != num_devices:
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} uses {math.prod(sizes)} devices, "
                     f"there are {num_devices}; set one axis to -1")
  return tuple(sizes)


def make_mesh(axis_sizes: dict[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh over all (global) devices with axes (data, fsdp, tensor)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(dict(axis_sizes), len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def path_name(path) -> str:
  """A jax key path -> 'llm/layers_0/mlp/up_proj/kernel'."""
  parts = []
  for k in path:
    parts.append(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))))
  return "/".join(parts)


def _axes_size(mesh: Mesh, axes) -> int:
  if axes is None:
    return 1
  axes = (axes,) if isinstance(axes, str) else tuple(axes)
  return math.prod(mesh.shape[a] for a in axes)


def spec_for(name: str, shape: tuple[int, ...], rules, mesh: Mesh, *, fsdp_min_elements: int = 0) -> P:
  """The PartitionSpec of one parameter: first matching rule, then divisibility checks."""
  for pattern, spec in rules:
    if re.fullmatch(pattern, name):
      break
  else:
    raise ValueError(f"parameter {name!r} matches no partition rule; end the rule list with ('.*', None)")
  if spec is None or len(shape) == 0:
    return P()
  if isinstance(spec, str):
    if spec != "fsdp":
      raise ValueError(f"partition rule {pattern!r}: spec {spec!r} is not a tuple, None or 'fsdp'")
    n = mesh.shape["fsdp"]
    if n == 1 or math.prod(shape) < fsdp_min_elements:
      return P()
    order = sorted(range(len(shape)), key=lambda i: -shape[i])
    dim = next((i for i in order if shape[i] % n == 0), None)
    if dim is None:
      return P()
    return P(*[("fsdp" if i == dim else None) for i in range(len(shape))])
  spec = tuple(spec)
  if len(spec) != len(shape):
    raise ValueError(f"partition rule {pattern!r} gives {len(spec)} dims for {name!r} of shape {shape}")
  out = []
  for axes, size in zip(spec, shape):
    out.append(axes if axes is not None and size % _axes_size(mesh, axes) == 0 else None)
  return P(*out)


def param_specs(params, rules, mesh: Mesh, *, fsdp_min_elements: int = 0):
  """A pytree of PartitionSpecs matching `params` (arrays or ShapeDtypeStructs)."""
  rules = [(str(p), (s if s is None or isinstance(s, str) else tuple(s))) for p, s in rules]
  return jax.tree_util.tree_map_with_path(
      lambda path, x: spec_for(path_name(path), tuple(x.shape), rules, mesh,
                               fsdp_min_elements=fsdp_min_elements), params)


def named(mesh: Mesh, specs):
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def batch_spec(ndim: int) -> P:
  return P(BATCH_AXES, *([None] * (ndim - 1)))


def batch_sharding(mesh: Mesh, batch) -> dict[str, NamedSharding]:
  """Every batch array is split over (data, fsdp) along its first dimension."""
  return jax.tree.map(lambda x: NamedSharding(mesh, batch_spec(np.ndim(x))), batch)


def batch_divisor(mesh: Mesh) -> int:
  return _axes_size(mesh, BATCH_AXES)


def global_batch(mesh: Mesh, local_batch: dict[str, Any]) -> dict[str, jax.Array]:
  """This process's rows (numpy) -> global jax Arrays split over (data, fsdp).

  On one process the local batch is the global batch; on several, the global batch is the
  concatenation of every process's rows in process order.
  """
  out = {}
  for key, x in local_batch.items():
    x = np.asarray(x)
    sharding = NamedSharding(mesh, batch_spec(x.ndim))
    global_shape = (x.shape[0] * jax.process_count(),) + x.shape[1:]
    out[key] = jax.make_array_from_process_local_data(sharding, x, global_shape)
  return out


def describe(params, specs) -> list[str]:
  """Human-readable lines 'path shape -> spec' for the log."""
  lines = []
  flat_p = jax.tree_util.tree_flatten_with_path(params)[0]
  flat_s = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))
  for (path, x), s in zip(flat_p, flat_s):
    lines.append(f"{path_name(path)} {tuple(x.shape)} -> {s}")
  return lines


def spread_over_all_axes(x: jax.Array, mesh: Mesh) -> jax.Array:
  """Constrains x's first dimension to be split over every mesh axis (when it divides).

  Used on the CNN's input: XLA's SPMD partitioner (jax 0.10.2, GSPMD and Shardy) computes
  wrong depthwise-convolution filter gradients when the batch is split over (data, fsdp)
  and replicated over `tensor`; fully batch-split, the result is right. The CNN is small,
  so tensor parallelism gains nothing there anyway.
  """
  if mesh.size == 1 or x.shape[0] % mesh.size:
    return x
  spec = P(MESH_AXES, *([None] * (x.ndim - 1)))
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
