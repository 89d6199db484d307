"""PyTorch TinyVLM (transformers' towers + torch heads) against the JAX TinyVLM on the same export."""

import dataclasses
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
import transformers

from tinyvlm_jax.convert import tinyvlm as convert
from tinyvlm_jax.data.images import preprocess
from tinyvlm_jax.generate import VLMGenerator
from tinyvlm_jax.models.tinyvlm import TinyVLM, param_shapes
from tinyvlm_jax.presets import model_config
from tinyvlm_jax.torch_model import TinyVLMTorch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NEW_TOKENS = 32


def _random_params(cfg, seed):
  """Every parameter random, heads included (the pooler's 0.25-identity init would hide a wrong
  tap order). Kernels at 2/sqrt(fan_in) and small embeddings: a 0.02-std LLM only ever repeats
  one token, which would make the 32-token greedy comparison trivial."""
  rng = np.random.default_rng(seed)

  def leaf(path, s):
    name, x = path[-1].key, rng.standard_normal(s.shape)
    if name == "scale":
      x = 1 + 0.1 * x
    elif name == "bias":
      x = 0.1 * x
    elif name == "embedding":  # small next to the layers' outputs, so the LLM does not just echo its input
      x = 0.3 * x
    elif len(s.shape) > 1:
      x = 2 * x / np.sqrt(np.prod(s.shape[:-1]))
    return x.astype(np.float32)
  return jax.tree_util.tree_map_with_path(leaf, param_shapes(cfg))


def _inputs(cfg, rng, text_len=6):
  image = rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)
  pix = preprocess(image, cfg)
  prompt = np.concatenate([rng.integers(0, 100, 3), np.full(cfg.num_visual_tokens, cfg.image_token_id),
                           rng.integers(0, 100, text_len)]).astype(np.int32)
  return prompt[None], pix["pixel_values"][None], (pix["cnn_pixel_values"][None] if cfg.use_cnn else None)


def _jax_logits(cfg, params, ids, pixels, cnn_pixels, mask=None):
  mask = np.ones_like(ids) if mask is None else mask
  positions = np.broadcast_to(np.arange(ids.shape[1], dtype=np.int32), ids.shape)
  logits, _ = TinyVLM(cfg).apply({"params": params}, ids, pixels, cnn_pixels, positions=positions,
                                 attention_mask=mask)
  return np.asarray(logits)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """A random tiny TinyVLM (JAX params) and its PyTorch export loaded by TinyVLMTorch."""
  cfg = model_config("tiny")
  params = _random_params(cfg, 0)
  folder = tmp_path_factory.mktemp("export")
  convert.save_export(folder, params, cfg)
  return cfg, params, folder, TinyVLMTorch.from_pretrained(folder)


def test_torch_logits_match_jax(tiny):
  cfg, params, _, model = tiny
  ids, pixels, cnn_pixels = _inputs(cfg, np.random.default_rng(0))
  want = _jax_logits(cfg, params, ids, pixels, cnn_pixels)
  with torch.no_grad():
    got = model(ids, pixels, cnn_pixels).numpy()
  diff = np.abs(got - want).max()
  print(f"max |logits torch - jax| = {diff:.2e} (logit scale {np.abs(want).max():.2f})")
  assert got.shape == (1, ids.shape[1], cfg.llm.vocab_size)
  assert diff < 1e-4


def test_visual_tokens_replace_placeholders_in_order(tiny):
  """Moving the image changes the logits after the placeholders, not the text before them."""
  cfg, _, _, model = tiny
  ids, pixels, cnn_pixels = _inputs(cfg, np.random.default_rng(1))
  with torch.no_grad():
    a = model(ids, pixels, cnn_pixels)
    b = model(ids, pixels[:, ::-1].copy(), cnn_pixels)  # views in reverse order
  first = int(np.argmax(ids[0] == cfg.image_token_id))
  torch.testing.assert_close(a[:, :first], b[:, :first], rtol=0, atol=0)
  assert (a[:, first + cfg.num_cnn_tokens:] - b[:, first + cfg.num_cnn_tokens:]).abs().max() > 1e-3


def test_greedy_generation_token_identical(tiny):
  """transformers' generate (its KV cache) against tinyvlm_jax.generate (ours): 32 identical tokens."""
  cfg, params, _, model = tiny
  ids, pixels, cnn_pixels = _inputs(cfg, np.random.default_rng(2))
  gen = VLMGenerator(cfg, params, stop_ids=(), pad_id=0)
  want = gen.generate([ids[0].tolist()], pixels, cnn_pixels, max_new_tokens=NEW_TOKENS)[0]
  got = model.generate(ids, pixels, cnn_pixels, max_new_tokens=NEW_TOKENS, stop_ids=())
  assert got.shape == (1, NEW_TOKENS)
  assert got[0].tolist() == want
  assert len(set(want)) > 8  # a varied sequence, not one token repeated


def test_generation_stops_at_stop_ids_and_samples(tiny):
  cfg, _, _, model = tiny
  ids, pixels, cnn_pixels = _inputs(cfg, np.random.default_rng(3))
  greedy = model.generate(ids, pixels, cnn_pixels, max_new_tokens=8, stop_ids=())[0].tolist()
  stop = greedy[2]
  seen = []

  class Streamer(transformers.generation.streamers.BaseStreamer):
    def put(self, value):
      seen.extend(value.reshape(-1).tolist())

    def end(self):
      seen.append("end")
  stopped = model.generate(ids, pixels, cnn_pixels, max_new_tokens=8, stop_ids=[stop], streamer=Streamer())[0].tolist()
  assert stopped == greedy[:greedy.index(stop) + 1]
  assert seen == stopped + ["end"]
  a = model.generate(ids, pixels, cnn_pixels, max_new_tokens=8, temperature=5.0, stop_ids=(), seed=0)
  b = model.generate(ids, pixels, cnn_pixels, max_new_tokens=8, temperature=5.0, stop_ids=(), seed=0)
  c = model.generate(ids, pixels, cnn_pixels, max_new_tokens=8, temperature=5.0, stop_ids=(), seed=1)
  assert a.tolist() == b.tolist() and a.tolist() != c.tolist()


def test_variant_without_cnn_mean_pooler_and_feature_layer(tmp_path):
  """Head tables follow the config: no pooler weights for `mean`, no cnn/fuser without the CNN."""
  cfg = dataclasses.replace(model_config("tiny"), use_cnn=False, pooler="mean", zoom=False, feature_layer=1)
  params = _random_params(cfg, 3)
  convert.save_export(tmp_path, params, cfg)
  model = TinyVLMTorch.from_pretrained(tmp_path)
  assert not any(k.startswith(("pooler.", "cnn.", "fuser.")) for k in model.state_dict())
  ids, pixels, _ = _inputs(cfg, np.random.default_rng(4))
  want = _jax_logits(cfg, params, ids, pixels, None)
  with torch.no_grad():
    got = model(ids, pixels).numpy()
  assert np.abs(got - want).max() < 1e-4


def test_torch_path_runs_without_jax(tiny):
  """launch/generate.py --backend torch must not need JAX: load and generate with `import jax` blocked."""
  _, _, folder, model = tiny
  cfg = model.config
  ids, pixels, cnn_pixels = _inputs(cfg, np.random.default_rng(5))
  want = model.generate(ids, pixels, cnn_pixels, max_new_tokens=4, stop_ids=())[0].tolist()
  np.savez(folder / "inputs.npz", ids=ids, pixels=pixels, cnn=cnn_pixels)
  code = (
      "import sys; sys.modules['jax'] = None; sys.modules['flax'] = None\n"
      "import numpy as np\n"
      "from tinyvlm_jax.torch_model import TinyVLMTorch\n"
      f"m = TinyVLMTorch.from_pretrained({str(folder)!r}); x = np.load({str(folder / 'inputs.npz')!r})\n"
      "print(m.generate(x['ids'], x['pixels'], x['cnn'], max_new_tokens=4, stop_ids=())[0].tolist())\n")
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.strip().splitlines()[-1] == str(want)
