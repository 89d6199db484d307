"""Small random batches for tests and smoke checks (the pipeline's batch layout, no files)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np

from tinyvlm_jax.models.config import TinyVLMConfig
from tinyvlm_jax.models.tinyvlm import FAST_COMPILE


def random_batch(config: TinyVLMConfig, batch: int, text_len: int = 24, *, seed: int = 0,
                 answer_len: int = 8) -> dict[str, np.ndarray]:
  """A right-padded batch like the pipeline's: image placeholders, a few padded rows, answer-only loss."""
  rs = np.random.RandomState(seed)
  n_vis = config.num_visual_tokens
  length = n_vis + text_len
  ids = rs.randint(0, min(config.llm.vocab_size, config.image_token_id), (batch, length)).astype(np.int32)
  ids[:, 1:1 + n_vis] = config.image_token_id
  lengths = length - rs.randint(0, text_len // 3, batch)  # some rows padded on the right
  attention = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
  loss_mask = np.zeros((batch, length), bool)
  for i, n in enumerate(lengths):
    loss_mask[i, n - answer_len:n] = True
  s, c = config.vision.image_size, config.cnn.image_size
  return dict(
      input_ids=np.where(attention == 1, ids, 0).astype(np.int32),
      loss_mask=loss_mask,
      attention_mask=attention,
      positions=(np.arange(length)[None] * attention).astype(np.int32),
      pixel_values=rs.uniform(-1, 1, (batch, config.num_views, s, s, 3)).astype(np.float32),
      cnn_pixel_values=rs.normal(size=(batch, c, c, 3)).astype(np.float32),
      has_image=np.ones((batch,), bool),
  )


# Tests compile many small programs and run each a few times: XLA:CPU's backend optimisations
# cost more compile time than they save (init_params is compiled with the same options).
FAST_COMPILE_FLAGS = " ".join(f"--{k}={str(v).lower()}" for k, v in FAST_COMPILE.items())


def xla_flags(num_devices: int) -> str:
  """XLA_FLAGS for a test subprocess: N fake CPU devices, fast compilation."""
  return f"--xla_force_host_platform_device_count={num_devices} {FAST_COMPILE_FLAGS}"


def run_with_devices(args: list[str], num_devices: int, *, timeout: float = 600, extra_env=None,
                     check: bool = True) -> subprocess.CompletedProcess:
  """Runs `python ARGS` with N fake CPU devices (XLA_FLAGS set before jax is imported)."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = xla_flags(num_devices)
  env["JAX_PLATFORMS"] = "cpu"
  env.update(extra_env or {})
  proc = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=timeout)
  if check and proc.returncode != 0:
    raise RuntimeError(f"`python {' '.join(args)}` exited with {proc.returncode}:\n{proc.stdout[-4000:]}\n"
                       f"{proc.stderr[-8000:]}")
  return proc


SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|image_pad|>")


def byte_tokenizer(out_dir: str) -> str:
  """A byte-level tokenizer.json (ids 0-255 = bytes, then the chat specials): every id fits
  the tiny preset's 512-row vocabulary. Returns the file's path."""
  from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers  # pylint: disable=g-import-not-at-top
  alphabet = pre_tokenizers.ByteLevel.alphabet()
  vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
  tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  tok.decoder = decoders.ByteLevel()
  tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, "tokenizer.json")
  tok.save(path)
  return path


def tiny_stage_config(data_json: str, tokenizer_path: str, *, total_steps: int = 6, every_steps: int = 3,
                      batch: int = 8, mesh: dict | None = None):
  """A stage of the tiny preset (no CNN) on a synthetic LLaVA JSON, for the loop's tests."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from tinyvlm_jax.presets import get_preset  # pylint: disable=g-import-not-at-top
  from tinyvlm_jax.train.config import stage_config  # pylint: disable=g-import-not-at-top
  c = stage_config()
  c.stage = "tiny"
  c.model = get_preset("tiny")
  c.model.use_cnn = False
  c.compute_dtype = "float32"
  c.init.params = "random"
  c.trainable = ("pooler", "connector", "llm")  # the vision tower stays frozen
  c.total_steps = total_steps
  c.global_batch_size = batch
  # Warmup then constant: the compiled step does not depend on total_steps, so runs of 3 and
  # 6 steps share one program (and the persistent compilation cache).
  c.schedule = ml_collections.ConfigDict(dict(kind="constant", lr_max=1e-3, lr_min=1e-3, warmup_steps=2))
  c.loss.neftune_alpha = 5.0
  c.loss.max_targets = 12
  c.data.sources = ml_collections.ConfigDict({"synthetic": dict(kind="llava_json", path=data_json, image_root="",
                                                                weight=1.0)})
  c.data.max_len = 128
  c.data.tokenizer_path = tokenizer_path
  c.mesh = ml_collections.ConfigDict(mesh or dict(data=-1, fsdp=1, tensor=1))
  c.checkpoint = ml_collections.ConfigDict(dict(every_steps=every_steps, keep=5, use_async=True))
  return c
