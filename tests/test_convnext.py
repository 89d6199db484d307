"""ConvNeXt-V2: parity with transformers' ConvNextV2Model, bit-exact weight round trip, full-size structure."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from tinyvlm_jax.convert import convnext as conv
from tinyvlm_jax.convert.mapping import CheckpointMismatchError, flatten
from tinyvlm_jax.models.convnext import ConvNextV2
from tinyvlm_jax.presets import model_config


def _tiny_cfg(**changes):
  return dataclasses.replace(model_config("tiny").cnn, **changes)


def _random_hf_model(cfg, seed=0):
  """A random transformers ConvNextV2Model with every tensor N(0, 0.2^2), GRN's zero init too.

  The scale keeps activations O(1) through the residual stream, so 1e-5 is a tight absolute bound."""
  torch.manual_seed(seed)
  model = transformers.ConvNextV2Model(conv.to_hf_config(cfg)).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.copy_(torch.randn_like(p) * 0.2)
  return model


@pytest.mark.parametrize("depths", [None, (2, 1, 3, 2)], ids=["tiny", "deeper"])
def test_last_hidden_state_matches_transformers(depths):
  cfg = _tiny_cfg() if depths is None else _tiny_cfg(depths=depths)
  hf = _random_hf_model(cfg)
  params = conv.params_from_hf(hf, cfg)
  # GRN really is exercised: its gamma/beta are far from transformers' zero init.
  assert np.abs(params["stages_0"]["layers_0"]["grn"]["weight"]).max() > 0.1

  rng = np.random.default_rng(1)
  pixels = rng.standard_normal((2, cfg.image_size, cfg.image_size, cfg.num_channels)).astype(np.float32)
  with torch.no_grad():
    out = hf(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2)))
  want = out.last_hidden_state.numpy().transpose(0, 2, 3, 1)  # NCHW -> NHWC

  model = ConvNextV2(cfg)
  got = np.asarray(model.apply({"params": params}, jnp.asarray(pixels)))
  assert got.shape == (2, cfg.grid, cfg.grid, cfg.hidden_sizes[-1])
  assert got.shape == want.shape
  diff = np.abs(got - want).max()
  assert np.abs(want).max() > 1.0  # the bound below is not vacuous
  assert diff <= 1e-5, f"last_hidden_state max abs diff {diff}"

  # The final LayerNorm we hold but do not use in __call__ gives transformers' pooler_output.
  pooled = np.asarray(model.apply({"params": params}, jnp.asarray(got), method=ConvNextV2.pooled))
  pooled_diff = np.abs(pooled - out.pooler_output.numpy()).max()
  assert pooled_diff <= 1e-5, f"pooler_output max abs diff {pooled_diff}"


def test_round_trip_is_bit_exact():
  cfg = _tiny_cfg(depths=(2, 1, 1, 2))
  hf = _random_hf_model(cfg, seed=3)
  state = {k: v.numpy() for k, v in hf.state_dict().items()}
  params = conv.params_from_hf(state, cfg)

  # Our params tree has exactly the shapes the model's own init makes.
  shapes = conv.param_shapes(cfg)
  assert jax.tree.structure(params) == jax.tree.structure(shapes)
  assert all(a.shape == b.shape for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(shapes)))

  back = conv.hf_state_from_params(params, cfg)
  assert set(back) == set(state)
  for key, value in state.items():
    assert back[key].dtype == value.dtype and back[key].shape == value.shape, key
    assert np.array_equal(back[key], value), f"{key} changed in the round trip"

  # The exported state dict loads strictly into transformers' model.
  fresh = transformers.ConvNextV2Model(conv.to_hf_config(cfg)).eval()
  fresh.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)
  # With a prefix, as inside ConvNextV2ForImageClassification.
  prefixed = conv.hf_state_from_params({"params": params}, cfg, prefix="convnextv2.")
  again = conv.params_from_hf(prefixed, cfg, prefix="convnextv2.")
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(params)))


def test_config_round_trip():
  cfg = model_config("tinyvlm_0p6b").cnn
  assert conv.config_from_hf(conv.to_hf_config(cfg)) == cfg
  assert conv.config_from_hf(conv.to_hf_config(cfg).to_dict()) == cfg


def test_full_size_structure_without_weights():
  cfg = model_config("tinyvlm_0p6b").cnn
  shapes = conv.param_shapes(cfg)
  with torch.device("meta"):
    hf = transformers.ConvNextV2Model(conv.to_hf_config(cfg))
  hf_shapes = {k: tuple(v.shape) for k, v in hf.state_dict().items()}

  table = conv.param_table(cfg)
  flat = flatten(shapes)
  assert len({r.hf for r in table}) == len(table) == len({r.flax for r in table})
  assert {r.hf for r in table} == set(hf_shapes)
  assert {r.flax for r in table} == set(flat)
  for rule in table:  # our shape, taken to torch's layout by the rule's transform
    as_hf = conv.TRANSFORMS[rule.transform][1](np.empty(flat[rule.flax].shape, np.int8)).shape
    assert tuple(as_hf) == hf_shapes[rule.hf], rule

  ours = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
  theirs = sum(int(np.prod(s)) for s in hf_shapes.values())
  assert ours == theirs
  assert 27.5e6 < ours < 28.3e6, ours  # ConvNeXt-V2-Tiny: 27.9 M

  x = jax.ShapeDtypeStruct((1, cfg.image_size, cfg.image_size, cfg.num_channels), jnp.float32)
  out = jax.eval_shape(ConvNextV2(cfg).apply, {"params": shapes}, x)
  assert out.shape == (1, cfg.grid, cfg.grid, cfg.hidden_sizes[-1]) == (1, 7, 7, 768)


def test_mismatched_checkpoint_names_the_key():
  cfg = _tiny_cfg()
  state = {k: v.numpy() for k, v in transformers.ConvNextV2Model(conv.to_hf_config(cfg)).state_dict().items()}

  bad = dict(state)
  key = "encoder.stages.1.layers.0.pwconv1.weight"
  bad[key] = np.zeros((7, 16), np.float32)
  with pytest.raises(CheckpointMismatchError) as err:
    conv.params_from_hf(bad, cfg)
  assert key in str(err.value) and "(7, 16)" in str(err.value) and "(64, 16)" in str(err.value)

  bad = dict(state)
  key = "encoder.stages.2.layers.0.grn.bias"
  bad[key] = np.zeros((1, 1, 1, 95), np.float32)
  with pytest.raises(CheckpointMismatchError) as err:
    conv.params_from_hf(bad, cfg)
  assert key in str(err.value) and "(1, 1, 1, 95)" in str(err.value) and "(1, 1, 1, 96)" in str(err.value)

  missing = dict(state)
  key = "encoder.stages.3.downsampling_layer.1.bias"
  del missing[key]
  with pytest.raises(CheckpointMismatchError, match="missing") as err:
    conv.params_from_hf(missing, cfg)
  assert key in str(err.value)


def test_depthwise_conv_equals_flax_grouped_conv_with_its_gradients():
  """On CPU DepthwiseConv sums shifted slices; it keeps nn.Conv's params, init, outputs and gradients."""
  import flax.linen as nn
  from tinyvlm_jax.models.convnext import DepthwiseConv
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 9, 11, 8), np.float32))
  ours, ref = DepthwiseConv(8), nn.Conv(8, (7, 7), padding=((3, 3), (3, 3)), feature_group_count=8)
  params = ours.init(jax.random.key(0), x)
  ref_params = ref.init(jax.random.key(0), x)
  assert jax.tree.map(np.shape, params) == jax.tree.map(np.shape, ref_params)
  np.testing.assert_array_equal(params["params"]["kernel"], ref_params["params"]["kernel"])  # same init
  params = jax.tree.map(lambda p: p + 0.1, params)  # a nonzero bias
  if jax.default_backend() == "cpu":
    assert "convolution" not in jax.jit(ours.apply).lower(params, x).as_text()  # the shifted sum ran
  np.testing.assert_allclose(ours.apply(params, x), ref.apply(params, x), rtol=1e-5, atol=1e-5)
  loss = lambda m: lambda p, x: jnp.sum(jnp.sin(m.apply(p, x)))
  for got, want in zip(jax.grad(loss(ours), argnums=(0, 1))(params, x), jax.grad(loss(ref), argnums=(0, 1))(params, x)):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), got, want)
