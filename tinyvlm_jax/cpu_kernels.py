"""Hand-written XLA:CPU kernels (`cpu_kernels.cc`), built with g++ on first use and registered
as FFI targets: the weight-only int8 / int4 GEMVs and dequantizers of `tinyvlm_jax.quantize`,
the float32 GEMVs of a decode step (`dense_dot_general` for the LLM's Dense layers, `tied_logits` for
its tied LM head), the attention
of a decode step and of a prompt chunk against the KV cache (`tinyvlm_jax.models.qwen2`) and the
vision tower's attention (`tinyvlm_jax.models.siglip`).

Each caller wraps them in `jax.lax.platform_dependent`, so one program still runs everywhere:
the kernels on CPU, the plain XLA formulation on accelerators (SigLIP's attention, whose
gradient recomputes the forward, is used only when the default backend is the CPU). Where they are
unavailable (no x86 CPU with AVX2 and FMA, no compiler, or TINYVLM_CPU_KERNELS=0) the XLA
formulation runs on CPU too. The library is cached under $TINYVLM_KERNEL_CACHE (default ~/.cache/tinyvlm_jax), keyed
by the source, the jax version and the CPU.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import math
import os
import platform
import subprocess
import tempfile

import jax
import jax.numpy as jnp

log = logging.getLogger(__name__)

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_kernels.cc")
DISABLE_ENV = "TINYVLM_CPU_KERNELS"  # set to 0 to use the XLA formulations on CPU too
CACHE_ENV = "TINYVLM_KERNEL_CACHE"
GEMV_MAX_ROWS = 16  # at most this many rows of x per call use the GEMV kernels (a decode step)

# FFI target (registered as "tinyvlm_" + name) -> exported handler symbol.
_TARGETS = {"gemv_f32": "TinyvlmGemvF32", "gemv_f32_t": "TinyvlmGemvF32T",
            "gemv_i8": "TinyvlmGemvI8", "gemv_i4": "TinyvlmGemvI4",
            "dequant_i8": "TinyvlmDequantI8", "dequant_i4": "TinyvlmDequantI4", "to_bf16": "TinyvlmToBf16",
            "decode_attention": "TinyvlmDecodeAttention",
            "attention": "TinyvlmAttention", "chunk_attention": "TinyvlmChunkAttention"}


def _cpu_flags() -> set[str]:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("flags"):
          return set(line.split(":", 1)[1].split())
  except OSError:
    pass
  return set()


def _cache_dir() -> str:
  return os.environ.get(CACHE_ENV, os.path.join(os.path.expanduser("~"), ".cache", "tinyvlm_jax"))


def _build(source: str, out: str) -> None:
  cmd = [os.environ.get("CXX", "g++"), "-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w",
         f"-I{jax.ffi.include_dir()}", source, "-o", out]
  subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)


@functools.cache
def available() -> bool:
  """Builds (once, cached by source hash and CPU) and registers the kernels; False if unavailable."""
  if os.environ.get(DISABLE_ENV, "1") == "0":
    return False
  if platform.machine() not in ("x86_64", "AMD64") or not {"avx2", "fma"} <= _cpu_flags():
    log.info("cpu_kernels: no AVX2/FMA CPU; XLA's own formulations run on CPU")
    return False
  with open(SOURCE, "rb") as f:
    key = hashlib.sha256(f.read() + jax.__version__.encode() + platform.processor().encode()
                         + " ".join(sorted(_cpu_flags())).encode()).hexdigest()[:16]
  path = os.path.join(_cache_dir(), f"libtinyvlm_cpu_{key}.so")
  if not os.path.exists(path):
    os.makedirs(_cache_dir(), exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=_cache_dir())
    os.close(fd)
    try:
      _build(SOURCE, tmp)
      os.replace(tmp, path)  # atomic: concurrent builders each write their own temp file
    except (OSError, subprocess.SubprocessError) as e:
      detail = getattr(e, "stderr", "") or str(e)
      log.warning("cpu_kernels: could not build %s (%s); XLA's own formulations run on CPU",
                  SOURCE, detail.strip()[-500:])
      if os.path.exists(tmp):
        os.remove(tmp)
      return False
  lib = ctypes.cdll.LoadLibrary(path)
  for name, symbol in _TARGETS.items():
    jax.ffi.register_ffi_target(f"tinyvlm_{name}", jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
  return True


def fits(*arrays, multiple: int) -> bool:
  """Whether a kernel takes these operands: the kernels are available, every array is float32 and
  the last dimension of the first (the head dim) is a multiple of `multiple`."""
  return (all(jnp.dtype(a.dtype) == jnp.float32 for a in arrays) and arrays[0].shape[-1] % multiple == 0
          and available())


def call(name: str, shape, *args, result_dtype=jnp.float32, **attrs):
  """Calls kernel `name` (a key of _TARGETS) on args; one result of `shape` (float32 unless told)."""
  return call_results(name, [shape], *args, result_dtype=result_dtype, **attrs)[0]


def call_results(name: str, shapes, *args, result_dtype=jnp.float32, **attrs) -> list:
  """Calls kernel `name` on args; a list of results (float32 unless told), one of each shape in `shapes`."""
  return jax.ffi.ffi_call(f"tinyvlm_{name}", [jax.ShapeDtypeStruct(s, result_dtype) for s in shapes],
                          vmap_method="sequential")(*args, **attrs)


def _kernel_with_xla_gradient(name: str, out_shape, xla):
  """f(x, w): kernel `name` on CPU (result shape out_shape(x, w)), `xla(x, w)` elsewhere; the gradient
  is always `xla`'s (the kernels are for inference)."""
  @jax.custom_vjp
  def f(x, w):
    return jax.lax.platform_dependent(x, w, cpu=lambda x, w: call(name, out_shape(x, w), x, w), default=xla)

  def fwd(x, w):
    return f(x, w), (x, w)

  def bwd(res, g):
    return jax.vjp(xla, *res)[1](g)

  f.defvjp(fwd, bwd)
  return f


# x [..., K] @ w [K, N] in float32: the `gemv_f32` kernel on CPU, XLA's dot elsewhere.
_gemv_f32 = _kernel_with_xla_gradient("gemv_f32", lambda x, w: x.shape[:-1] + (w.shape[1],), jnp.matmul)
# x [..., K] @ w [N, K].T in float32: the `gemv_f32_t` kernel on CPU, XLA's dot elsewhere.
_gemv_f32_t = _kernel_with_xla_gradient("gemv_f32_t", lambda x, w: x.shape[:-1] + (w.shape[0],),
                                        lambda x, w: jnp.einsum("...k,nk->...n", x, w))


def dense_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
  """`jax.lax.dot_general` for `nn.Dense(dot_general=...)`: a float32 decode step (x [..., K] with at
  most GEMV_MAX_ROWS rows, kernel [K, N], N % 8 == 0) runs the `gemv_f32` kernel on CPU, which
  streams the weights at the memory's speed (XLA:CPU's dot packs them first: the full-size LLM's MLP
  weights at 15.6 GB/s against the kernel's 20.1 here); everything else is `jax.lax.dot_general`.
  Same params, same results up to the order of the float32 sums; differentiable (the gradient uses
  XLA's dots)."""
  (lc, rc), (lb, rb) = dimension_numbers
  rows = math.prod(lhs.shape[:-1])
  if (lb or rb or tuple(lc) != (lhs.ndim - 1,) or tuple(rc) != (0,) or rhs.ndim != 2
      or rows > GEMV_MAX_ROWS or rhs.shape[1] % 8
      or (preferred_element_type is not None and jnp.dtype(preferred_element_type) != jnp.float32)
      or not fits(lhs, rhs, multiple=1)):
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type)
  return _gemv_f32(lhs, rhs)


MATMUL_DTYPES = ("float32", "bfloat16")


def check_matmul_dtype(matmul_dtype: str) -> str:
  if matmul_dtype not in MATMUL_DTYPES:
    raise ValueError(f"matmul_dtype must be one of {', '.join(MATMUL_DTYPES)}, got {matmul_dtype!r}")
  return matmul_dtype


def bfloat16_matmuls_are_fast() -> bool:
  """Whether bfloat16 products run in hardware here: an accelerator, or a CPU with AVX512-BF16 or
  AMX-BF16 (elsewhere XLA:CPU converts them and they may be slower than float32)."""
  if jax.default_backend() != "cpu":
    return True
  return bool({"avx512_bf16", "amx_bf16"} & _cpu_flags())


@jax.custom_vjp
def _bfloat16_after(after, x):
  return jax.lax.platform_dependent(
      after, x, cpu=lambda a, x: call("to_bf16", x.shape, a, x, result_dtype=jnp.bfloat16),
      default=lambda a, x: x.astype(jnp.bfloat16))


def _bfloat16_after_fwd(after, x):
  return _bfloat16_after(after, x), after


def _bfloat16_after_bwd(after, g):  # a convert's gradient; none for the ordering operand
  return jnp.zeros_like(after), g.astype(jnp.float32)


_bfloat16_after.defvjp(_bfloat16_after_fwd, _bfloat16_after_bwd)


def bfloat16_after(after, x):
  """x (float32) in bfloat16, converted only once `after` exists: on CPU the `to_bf16` kernel, which
  takes `after` as an unread operand (XLA ran its own converts of a prefill's weights, which depend on
  parameters alone, all at the start: every layer's bfloat16 weights alive at once); elsewhere
  `x.astype(bfloat16)`. The same bits either way; differentiable as the convert is."""
  if not available():
    return x.astype(jnp.bfloat16)
  return _bfloat16_after(after, x)


@functools.cache
def matmul_dot_general(matmul_dtype: str = "float32"):
  """nn.Dense's `dot_general` for a tower's `matmul_dtype` (an inference option).

  float32: `dense_dot_general`. bfloat16: a float32 product of more than GEMV_MAX_ROWS rows (a prefill,
  the image encoder; also a quantized layer's, on its dequantized weights) rounds both operands to
  bfloat16 and sums in float32, with a float32 result; the residual stream, norms, softmax and
  attention stay float32, and so does a decode step (its float32 GEMV kernel streams the weights at
  the memory's speed, where a bfloat16 product would first convert them). On a 2-core Zen 5 CPU with AVX512-BF16, XLA's bfloat16 dot ran at 872 GFLOP/s against 443
  in float32 (832 x 896 @ 896 x 4864), and the full-size TinyVLM's time to first token went from
  3.17 to 2.06 s."""
  check_matmul_dtype(matmul_dtype)
  if matmul_dtype == "float32":
    return dense_dot_general

  def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    (lc, _), _ = dimension_numbers
    rows = math.prod(lhs.shape) // max(1, math.prod(lhs.shape[d] for d in lc))
    if rows <= GEMV_MAX_ROWS or not all(jnp.dtype(a.dtype) == jnp.float32 for a in (lhs, rhs)):
      return dense_dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type)
    return jax.lax.dot_general(lhs.astype(jnp.bfloat16), bfloat16_after(lhs, rhs), dimension_numbers,
                               precision=precision, preferred_element_type=jnp.float32)

  return dot_general


def tied_logits(x, embedding):
  """x [..., D] @ embedding [V, D].T: a tied LM head's logits. A float32 batched decode step (2 to
  GEMV_MAX_ROWS rows, V and D multiples of 8) runs the `gemv_f32_t` kernel on CPU, which reads the
  table once for all rows of x: 32-43 ms for a batch-8 step of the full-size head against XLA's
  61-87. One row and everything else is XLA's dot (at one row it streams the table at the memory's
  speed, 5-20% faster than the kernel here). The kernel gives a row the same bits in a batch as it
  gives that row alone (XLA's one-row dot may differ in the last bits). Differentiable (the
  gradient uses XLA's dots)."""
  rows = math.prod(x.shape[:-1])
  if (not 2 <= rows <= GEMV_MAX_ROWS or embedding.ndim != 2 or embedding.shape[0] % 8
      or x.shape[-1] % 8 or not fits(x, embedding, multiple=1)):
    return jnp.einsum("...d,vd->...v", x, embedding)
  return _gemv_f32_t(x, embedding)
