"""Model FLOPs per train step and the devices' peak FLOP/s, for the MFU estimate.

Formula (the usual 6N rule with PaLM's attention term, per tower):

  dense    6 * P_matmul * T        for a tower whose P_matmul matrix-multiply weights see T tokens
  attn     12 * n_layers * T * S * d_model   (S = sequence length of that tower; QK^T and AV, fwd + bwd)
  LM head  6 * d_model * V * T_head    (T_head: positions given to the head: supervised targets only
                                        when loss.max_targets > 0, else every position)

Towers: SigLIP on views x patches tokens per image, the pooler and connector on the pooled
tokens, ConvNeXt as 6 * (its weights) * (output cells of its stage) and the fuser on the CNN
tokens (stage 3), Qwen2 on the real (unpadded) tokens of the batch. Embedding lookups are
free. Frozen towers are counted like trainable ones (their activations are still
back-propagated through), so this is "model FLOPs", not hardware FLOPs: remat recompute is
not counted. MFU = model FLOPs / (step time * devices * peak FLOP/s per device).
"""

from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from tinyvlm_jax.models.config import TinyVLMConfig

# Dense bf16 peak FLOP/s per device (TPU: per chip; GPU: SXM dense tensor-core).
PEAK_FLOPS = {
    "tpu v4": 275e12,
    "tpu v5 lite": 197e12,  # v5e
    "tpu v5e": 197e12,
    "tpu v5p": 459e12,
    "tpu v5": 459e12,
    "tpu v6 lite": 918e12,  # v6e (Trillium)
    "tpu v6e": 918e12,
    "nvidia h100": 989e12,
    "nvidia h200": 989e12,
    "nvidia a100": 312e12,
    "nvidia l4": 121e12,
    "nvidia a10g": 125e12,
}


def _matmul_params(tree) -> int:
  """Weights of rank >= 2 (kernels, conv filters), the ones that multiply activations."""
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree) if len(x.shape) >= 2)


def step_flops(config: TinyVLMConfig, shapes, *, tokens: float, images: float, head_positions: float,
               seq_len: int) -> float:
  """Model FLOPs of one train step over the global batch (see the module docstring).

  shapes: the params tree (arrays or ShapeDtypeStructs); tokens: real LLM tokens in the batch;
  images: rows with an image; head_positions: rows x positions given to the LM head.
  """
  llm_cfg, vis = config.llm, config.vision
  llm_dense = _matmul_params({k: v for k, v in shapes["llm"].items() if k != "embed_tokens"})
  flops = 6.0 * llm_dense * tokens
  flops += 12.0 * llm_cfg.num_hidden_layers * tokens * seq_len * llm_cfg.hidden_size
  flops += 6.0 * llm_cfg.hidden_size * llm_cfg.vocab_size * head_positions
  vit_tokens = images * config.num_views * vis.num_patches
  flops += 6.0 * _matmul_params(shapes["vision"]) * vit_tokens
  flops += 12.0 * vis.num_hidden_layers * vit_tokens * vis.num_patches * vis.hidden_size
  pooled = images * config.num_vit_tokens
  flops += 6.0 * _matmul_params(shapes["connector"]) * pooled
  flops += 6.0 * _matmul_params(shapes["pooler"]) * pooled
  if config.use_cnn and "cnn" in shapes:
    # Each ConvNeXt stage's weights see that stage's cells: (C / (patch * 2^s))^2.
    cnn = config.cnn
    for s in range(len(cnn.depths)):
      cells = (cnn.image_size // (cnn.patch_size * 2 ** s)) ** 2
      stage = shapes["cnn"].get(f"stages_{s}", {})
      flops += 6.0 * _matmul_params(stage) * cells * images
    flops += 6.0 * _matmul_params(shapes["fuser"]) * images * config.num_cnn_tokens
    flops += 12.0 * images * config.num_cnn_tokens * vis.num_patches * llm_cfg.hidden_size
  return flops


_CPU_PEAK: dict[str, float] = {}


def measured_cpu_peak(sizes: tuple[int, ...] = (512, 1024, 2048), repeats: int = 5) -> float:
  """FLOP/s of float32 n x n matmuls on this host's first device: the best over `sizes` (best of
  `repeats` each). One size alone misjudges the peak: on a 2-core AVX-512 host a 512 matmul ran at
  232 GFLOP/s and a 1024 one at 464 (XLA splits the small one over fewer threads), so a train step's
  large matmuls showed 118% "MFU" against the 512 figure."""
  key = ",".join(map(str, sizes))
  if key not in _CPU_PEAK:
    f = jax.jit(lambda x: x @ x)
    rate = 0.0
    for n in sizes:
      a = jnp.ones((n, n), jnp.float32)
      f(a).block_until_ready()
      best = math.inf
      for _ in range(repeats):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
      rate = max(rate, 2.0 * n ** 3 / best)
    _CPU_PEAK[key] = rate
  return _CPU_PEAK[key]


def peak_flops_per_device(configured: float = 0.0) -> tuple[float, str]:
  """-> (peak FLOP/s of one device, where the number came from)."""
  if configured and configured > 0:
    return float(configured), "config"
  device = jax.devices()[0]
  kind = getattr(device, "device_kind", "").lower()
  for name, peak in PEAK_FLOPS.items():
    if kind.startswith(name):
      return peak, f"table ({device.device_kind})"
  if device.platform == "cpu":
    # Fake CPU devices share the host's cores: the measured matmul rate is split among them.
    return measured_cpu_peak() / jax.local_device_count(), "measured (cpu float32 matmul)"
  return 0.0, f"unknown device kind {device.device_kind!r}: set peak_flops_per_device"
