"""SigLIP tower: parity with transformers' SiglipVisionModel, the weight mapping both ways, full-size structure."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import SiglipVisionModel

from tinyvlm_jax import cpu_kernels
from tinyvlm_jax.convert.mapping import TRANSFORMS, CheckpointMismatchError, flatten
from tinyvlm_jax.convert.siglip import (IGNORED_KEYS, config_from_hf, hf_state_from_params, param_shapes,
                                        param_table, params_from_hf, to_hf_config)
from tinyvlm_jax.models import siglip
from tinyvlm_jax.models.siglip import SiglipVisionTower
from tinyvlm_jax.presets import model_config


def _torch_model(cfg, seed=0, use_head=False):
  """Small random SiglipVisionModel; every parameter (LayerNorms and zero biases too) is perturbed."""
  torch.manual_seed(seed)
  hf_config = to_hf_config(cfg)
  hf_config.vision_use_head = use_head
  hf_config._attn_implementation = "eager"
  model = SiglipVisionModel(hf_config).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  return model


@pytest.fixture(scope="module")
def tiny():
  cfg = model_config("tiny").vision
  return cfg, _torch_model(cfg)


def _pixels(cfg, n=2, seed=0):
  """Random NHWC image batch in [-1, 1]."""
  return np.random.default_rng(seed).uniform(-1, 1, (n, cfg.image_size, cfg.image_size, 3)).astype(np.float32)


def _torch_forward(model, pixels):
  with torch.no_grad():
    out = model(torch.from_numpy(pixels).permute(0, 3, 1, 2), output_hidden_states=True)  # NHWC -> NCHW
  return out.last_hidden_state.numpy(), [h.numpy() for h in out.hidden_states]


def test_matches_transformers(tiny):
  cfg, model = tiny
  params = params_from_hf(model, cfg)
  pixels = _pixels(cfg)
  last, hidden = jax.jit(SiglipVisionTower(cfg).apply)({"params": params}, pixels)
  want_last, want_hidden = _torch_forward(model, pixels)

  assert len(hidden) == len(want_hidden) == cfg.num_hidden_layers + 1
  assert last.shape == (2, cfg.num_patches, cfg.hidden_size)
  for i, (got, want) in enumerate(zip(hidden, want_hidden)):
    diff = np.max(np.abs(np.asarray(got) - want))
    assert diff <= 1e-5, f"hidden_states[{i}]: max abs diff {diff:.2e}"
  diff = np.max(np.abs(np.asarray(last) - want_last))
  assert diff <= 1e-5, f"last_hidden_state: max abs diff {diff:.2e}"
  # The output is not trivially small, so the tolerance means something.
  assert np.std(want_last) > 0.1


def test_round_trip_is_bit_exact(tiny):
  cfg, model = tiny
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  back = hf_state_from_params(params_from_hf(state, cfg), cfg)
  assert set(back) == set(state)
  for k, v in state.items():
    assert back[k].dtype == v.dtype and np.array_equal(back[k], v), k
  # And it loads into transformers with no missing or unexpected keys.
  fresh = SiglipVisionModel(to_hf_config(cfg))
  result = fresh.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)
  assert not result.missing_keys and not result.unexpected_keys


def test_loads_saved_folder(tiny, tmp_path):
  cfg, model = tiny
  model.save_pretrained(tmp_path)
  from_folder = params_from_hf(tmp_path, cfg)
  from_module = params_from_hf(model, cfg)
  for path, value in flatten(from_module).items():
    assert np.array_equal(flatten(from_folder)[path], value), path


def test_loads_nested_checkpoint_with_map_head(tiny):
  """A whole-SigLIP checkpoint: tower under "vision_model.", a MAP head and text-tower keys beside it."""
  cfg, model = tiny
  headed = _torch_model(cfg, seed=1, use_head=True)
  state = {f"vision_model.{k}": v for k, v in model.state_dict().items()}
  state.update({f"vision_model.{k}": v for k, v in headed.state_dict().items() if k.startswith("head.")})
  state["vision_model.embeddings.position_ids"] = torch.arange(cfg.num_patches)[None]
  state["text_model.embeddings.token_embedding.weight"] = torch.zeros(8, cfg.hidden_size)
  assert {k[len("vision_model."):] for k in state if ".head." in k or k.endswith("position_ids")} <= set(IGNORED_KEYS)
  params = params_from_hf(state, cfg, prefix="vision_model.")
  for path, value in flatten(params_from_hf(model, cfg)).items():
    assert np.array_equal(flatten(params)[path], value), path
  # Without the prefix the error says which prefix to pass.
  with pytest.raises(CheckpointMismatchError, match=r"pass prefix='vision_model\.'"):
    params_from_hf(state, cfg)


def test_full_size_structure_without_weights():
  cfg = model_config("tinyvlm_0p6b").vision
  flax_shapes = {path: tuple(x.shape) for path, x in flatten(param_shapes(cfg)).items()}
  with torch.device("meta"):
    hf_model = SiglipVisionModel(to_hf_config(cfg))
  hf_shapes = {k: tuple(v.shape) for k, v in hf_model.state_dict().items()}

  table = param_table(cfg)
  assert len({r.hf for r in table}) == len({r.flax for r in table}) == len(table)  # one-to-one
  assert {r.hf for r in table} == set(hf_shapes)
  assert {r.flax for r in table} == set(flax_shapes)
  for rule in table:
    as_flax = TRANSFORMS[rule.transform][0](np.empty(hf_shapes[rule.hf], np.int8)).shape
    assert as_flax == flax_shapes[rule.flax], (rule.hf, hf_shapes[rule.hf], flax_shapes[rule.flax])

  n_flax = sum(int(np.prod(s)) for s in flax_shapes.values())
  n_torch = sum(p.numel() for p in hf_model.parameters())
  assert n_flax == n_torch  # 86,088,960 for SigLIP-B/16-384 without the MAP head

  # DESIGN 1's "93.2 M" is transformers' default SiglipVisionModel, MAP head included; ours
  # is exactly that model less the head's parameters (the keys IGNORED_KEYS drops).
  headed_config = to_hf_config(cfg)
  headed_config.vision_use_head = True
  with torch.device("meta"):
    headed = dict(SiglipVisionModel(headed_config).named_parameters())
  head = {k: p.numel() for k, p in headed.items() if k.startswith("head.")}
  assert set(head) <= set(IGNORED_KEYS)
  assert n_flax == sum(p.numel() for p in headed.values()) - sum(head.values())


def test_wrong_shape_names_key_and_shapes(tiny):
  cfg, model = tiny
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  key = "encoder.layers.1.mlp.fc1.weight"
  good = state[key].shape
  state[key] = np.zeros((good[0] + 1, good[1]), np.float32)
  with pytest.raises(CheckpointMismatchError) as e:
    params_from_hf(state, cfg)
  msg = str(e.value)
  assert key in msg and str((good[0] + 1, good[1])) in msg and str(tuple(good)) in msg, msg


def test_missing_key_is_named(tiny):
  cfg, model = tiny
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  del state["encoder.layers.0.self_attn.v_proj.bias"]
  with pytest.raises(CheckpointMismatchError, match=r"encoder\.layers\.0\.self_attn\.v_proj\.bias"):
    params_from_hf(state, cfg)


def test_config_round_trip():
  cfg = model_config("tinyvlm_0p6b").vision
  assert config_from_hf(to_hf_config(cfg)) == cfg


def test_bfloat16_compute_keeps_float32_params(tiny):
  cfg, model = tiny
  params = params_from_hf(model, cfg)
  pixels = _pixels(cfg)
  ref, _ = _torch_forward(model, pixels)
  bf16 = dataclasses.replace(cfg, dtype="bfloat16")
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(param_shapes(bf16)))
  out, hidden = jax.jit(SiglipVisionTower(bf16).apply)({"params": params}, pixels)
  assert out.dtype == jnp.bfloat16 and all(h.dtype == jnp.bfloat16 for h in hidden)
  rel = np.max(np.abs(np.asarray(out, np.float32) - ref)) / np.max(np.abs(ref))
  assert rel < 0.05, rel


def test_cpu_attention_kernel_matches_transformers_and_xla_gradients():
  """head_dim 16 (the kernel's path on CPU): hidden states equal transformers', gradients XLA's."""
  if not cpu_kernels.available() or jax.default_backend() != "cpu":
    pytest.skip("CPU kernels unavailable here (no AVX2/FMA or no compiler) or not a CPU backend")
  cfg = dataclasses.replace(model_config("tiny").vision, hidden_size=64, num_attention_heads=4, image_size=40)
  model = _torch_model(cfg, seed=3)
  params = params_from_hf(model, cfg)
  pixels = _pixels(cfg, n=3)
  apply = jax.jit(SiglipVisionTower(cfg).apply)
  assert "tinyvlm_attention" in apply.lower({"params": params}, pixels).as_text()
  last, _ = apply({"params": params}, pixels)
  want_last, _ = _torch_forward(model, pixels)
  assert np.max(np.abs(np.asarray(last) - want_last)) <= 1e-5

  rng = np.random.default_rng(0)
  q, k, v, w = (jnp.asarray(rng.normal(size=(2, 37, 3, 16)).astype(np.float32) * 2) for _ in range(4))
  loss = lambda f: lambda q, k, v: jnp.sum(f(q, k, v, 0.25) * w)
  got = jax.jit(jax.grad(loss(siglip.attention), argnums=(0, 1, 2)))(q, k, v)
  want = jax.jit(jax.grad(loss(siglip.attention_xla), argnums=(0, 1, 2)))(q, k, v)
  for g, h in zip(got, want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(h), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(siglip.attention(q, k, v, 0.25)), np.asarray(siglip.attention_xla(q, k, v, 0.25)),
                             rtol=1e-5, atol=1e-5)
