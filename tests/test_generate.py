"""Batched generation: batch == alone, parity with transformers' generate, sampling, compile count."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tinyvlm_jax.convert import qwen2 as qwen_convert
from tinyvlm_jax.generate import LMDecoder, Sampling, VLMGenerator, left_pad, sample_next, strip_after_stop
from tinyvlm_jax.models.tinyvlm import init_params
from tinyvlm_jax.presets import model_config

STOP = (3, 4)
PAD = 0


@pytest.fixture(scope="module")
def hf_qwen():
  torch.manual_seed(0)
  from transformers import Qwen2ForCausalLM
  cfg = model_config("tiny").llm
  model = Qwen2ForCausalLM(qwen_convert.to_hf_config(cfg)).eval()
  with torch.no_grad():  # spread the logits so greedy paths are not ties
    for p in model.parameters():
      p.mul_(4.0)
  return cfg, model, qwen_convert.params_from_hf(model, cfg)


def _hf_greedy(model, ids, mask, max_new, embeds=None):
  kwargs = dict(attention_mask=torch.tensor(mask), max_new_tokens=max_new, do_sample=False,
                eos_token_id=list(STOP), pad_token_id=PAD)
  with torch.no_grad():
    if embeds is None:
      out = model.generate(input_ids=torch.tensor(ids, dtype=torch.long), **kwargs)[:, ids.shape[1]:]
    else:
      out = model.generate(inputs_embeds=torch.tensor(np.asarray(embeds)), **kwargs)
  return strip_after_stop(out.numpy(), STOP)


def test_greedy_equals_transformers_generate_text_only(hf_qwen):
  cfg, model, params = hf_qwen
  rng = np.random.default_rng(0)
  prompts = [rng.integers(5, cfg.vocab_size, n).tolist() for n in (7, 12, 3)]
  ids, mask = left_pad(prompts, 12, PAD)
  dec = LMDecoder(cfg, stop_ids=STOP, pad_id=PAD)
  embeds = dec.model.apply({"params": params}, jnp.asarray(ids), method="embed")
  *_, ours = dec.generate(params, embeds, jnp.asarray(mask), max_new_tokens=16)
  want = _hf_greedy(model, ids, mask, 16)
  assert strip_after_stop(ours, STOP) == want
  assert sum(len(w) for w in want) > 20  # the comparison covers many decoded tokens


def test_greedy_equals_transformers_generate_with_inputs_embeds(hf_qwen):
  """Image-like embeddings (not rows of the embedding table) fed as inputs_embeds to both."""
  cfg, model, params = hf_qwen
  rng = np.random.default_rng(1)
  mask = np.array([[0, 0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 1]], np.int32)
  embeds = rng.normal(size=(2, 8, cfg.hidden_size)).astype(np.float32)
  dec = LMDecoder(cfg, stop_ids=STOP, pad_id=PAD)
  *_, ours = dec.generate(params, jnp.asarray(embeds), jnp.asarray(mask), max_new_tokens=12)
  assert strip_after_stop(ours, STOP) == _hf_greedy(model, None, mask, 12, embeds=embeds)


@pytest.fixture(scope="module")
def tiny_vlm():
  cfg = model_config("tiny")
  params = init_params(cfg, jax.random.key(0))
  params = jax.tree.map(lambda p: p * 3.0, params)  # larger weights: distinct greedy paths per prompt
  return cfg, params


def _vlm_batch(cfg, n, seed=0):
  rng = np.random.default_rng(seed)
  s, c = cfg.vision.image_size, cfg.cnn.image_size
  pixels = rng.uniform(-1, 1, (n, cfg.num_views, s, s, 3)).astype(np.float32)
  cnn = rng.normal(size=(n, c, c, 3)).astype(np.float32)
  prompts = []
  for i in range(n):
    text = rng.integers(5, 400, 2 + 5 * i).tolist()
    prompts.append(text[:1] + [cfg.image_token_id] * cfg.num_visual_tokens + text[1:])
  return prompts, pixels, cnn


def test_batch_equals_each_prompt_alone(tiny_vlm):
  cfg, params = tiny_vlm
  prompts, pixels, cnn = _vlm_batch(cfg, 3)
  gen = VLMGenerator(cfg, params, stop_ids=STOP, pad_id=PAD, buckets=(32, 64))
  batch = gen.generate(prompts, pixels, cnn, max_new_tokens=10)
  alone = [gen.generate(prompts[i:i + 1], pixels[i:i + 1], cnn[i:i + 1], max_new_tokens=10)[0]
           for i in range(3)]
  assert batch == alone
  assert len({tuple(b) for b in batch}) > 1  # the rows really differ (images and prompts matter)
  # prompts of 23, 28 and 33 tokens fall in buckets 32, 32, 64: shapes (3, 64), (1, 32), (1, 64)
  assert gen.stats.compiled_programs == 3
  assert gen.decoder._prefill._cache_size() == 3  # what jit really compiled
  gen.generate(prompts[1:2], pixels[1:2], cnn[1:2], max_new_tokens=10)  # a new prompt, a known shape
  assert gen.decoder._prefill._cache_size() == 3


def test_image_changes_the_answer(tiny_vlm):
  cfg, params = tiny_vlm
  prompts, pixels, cnn = _vlm_batch(cfg, 1)
  gen = VLMGenerator(cfg, params, stop_ids=STOP, pad_id=PAD, buckets=(64,))
  a = gen.generate(prompts, pixels, cnn, max_new_tokens=8)
  b = gen.generate(prompts, -pixels, cnn, max_new_tokens=8)
  assert a != b


def test_sampling_filters():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  keys = jax.random.split(jax.random.key(0), 400)
  draw = lambda s: np.array([int(sample_next(logits, k, s)[0]) for k in keys[:200]])
  assert set(draw(Sampling(temperature=1.0, top_k=2))) == {0, 1}
  assert set(draw(Sampling(temperature=1.0, top_p=0.7))) == {0, 1}  # 0.5 + 0.3 reaches 0.7
  assert set(draw(Sampling(temperature=1.0, top_k=1))) == {0}
  assert len(set(draw(Sampling(temperature=1.0)))) == 4
  assert int(sample_next(logits, keys[0], Sampling())[0]) == 0


def test_sampling_is_reproducible_and_stops(tiny_vlm):
  cfg, params = tiny_vlm
  prompts, pixels, cnn = _vlm_batch(cfg, 2)
  gen = VLMGenerator(cfg, params, stop_ids=STOP, pad_id=PAD, buckets=(64,))
  s = Sampling(temperature=1.0, top_k=50)
  a = gen.generate(prompts, pixels, cnn, max_new_tokens=12, sampling=s, rng=jax.random.key(7))
  b = gen.generate(prompts, pixels, cnn, max_new_tokens=12, sampling=s, rng=jax.random.key(7))
  c = gen.generate(prompts, pixels, cnn, max_new_tokens=12, sampling=s, rng=jax.random.key(8))
  assert a == b and a != c
  assert all(not (set(row) & set(STOP)) for row in a)


def test_streaming_chunks_equal_one_shot(tiny_vlm):
  cfg, params = tiny_vlm
  prompts, pixels, cnn = _vlm_batch(cfg, 2)
  gen = VLMGenerator(cfg, params, stop_ids=STOP, pad_id=PAD, buckets=(64,))
  steps = list(gen.stream(prompts, pixels, cnn, max_new_tokens=9, chunk=2))
  assert [s.shape[1] for s in steps][:3] == [1, 3, 5]
  assert strip_after_stop(steps[-1], STOP) == gen.generate(prompts, pixels, cnn, max_new_tokens=9)
