"""Conversion CLIs: transformers folders -> JAX model folder -> PyTorch export -> JAX, and their errors."""

import json
import os
import re
import runpy
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from tinyvlm_jax import model_io
from tinyvlm_jax.convert import convnext, qwen2, siglip
from tinyvlm_jax.convert import tinyvlm as convert
from tinyvlm_jax.convert.mapping import flatten, load_state_dict
from tinyvlm_jax.models.tinyvlm import param_shapes
from tinyvlm_jax.presets import model_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREFIXES = {"siglip": convert.VISION_PREFIX, "qwen": convert.LLM_PREFIX, "convnext": convert.CNN_PREFIX}
BACKBONE_CLASSES = {"vision_config": transformers.SiglipVisionModel, "text_config": transformers.Qwen2ForCausalLM,
                    "cnn_config": transformers.ConvNextV2Model}
TOKENIZER_JSON = {"version": "1.0", "added_tokens": [{"id": 510, "content": "<|im_end|>"},
                                                     {"id": 511, "content": "<|endoftext|>"}]}


def _cli(name, *args, expect=0):
  """Runs convert/NAME.py in a fresh interpreter, as a user would."""
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  out = subprocess.run([sys.executable, os.path.join(REPO, "convert", f"{name}.py"), *map(str, args)],
                       capture_output=True, text=True, env=env, timeout=600)
  assert out.returncode == expect, f"{name} exited {out.returncode}:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"
  return out


def _main(name, *args, expect=0, capsys=None):
  """Runs the CLI's main() in this process (same code path, no interpreter start-up)."""
  main = runpy.run_path(os.path.join(REPO, "convert", f"{name}.py"), run_name="cli")["main"]
  rc = main([str(a) for a in args])
  err = capsys.readouterr().err if capsys is not None else ""
  assert rc == expect, err
  return err


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
  """Small random transformers SigLIP, Qwen2 (with tokenizer files) and ConvNeXt-V2, via save_pretrained."""
  cfg = model_config("tiny")
  root = tmp_path_factory.mktemp("hf")
  torch.manual_seed(0)
  models = {"siglip": transformers.SiglipVisionModel(siglip.to_hf_config(cfg.vision)),
            "qwen": transformers.Qwen2ForCausalLM(qwen2.to_hf_config(cfg.llm)),
            "convnext": transformers.ConvNextV2Model(convnext.to_hf_config(cfg.cnn))}
  dirs = {}
  for name, model in models.items():
    with torch.no_grad():  # LayerNorm/GRN/bias init are constants: make every tensor distinct
      for p in model.parameters():
        p.add_(0.01 * torch.randn_like(p))
    dirs[name] = root / name
    model.save_pretrained(dirs[name])
  (dirs["qwen"] / "tokenizer.json").write_text(json.dumps(TOKENIZER_JSON))
  (dirs["qwen"] / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 512}))
  return dirs


@pytest.fixture(scope="module")
def jax_dir(hf_dirs, tmp_path_factory):
  out = tmp_path_factory.mktemp("jax") / "model"
  _cli("hf_to_jax", "--siglip", hf_dirs["siglip"], "--qwen", hf_dirs["qwen"], "--convnext", hf_dirs["convnext"],
       "--out", out, "--preset", "tiny", "--seed", "3")
  return out


@pytest.fixture(scope="module")
def export_dir(jax_dir, tmp_path_factory):
  out = tmp_path_factory.mktemp("pt") / "export"
  _cli("jax_to_torch", "--checkpoint", jax_dir, "--out", out)
  return out


def test_hf_to_jax_to_torch_is_bit_identical(hf_dirs, jax_dir, export_dir):
  export = load_file(export_dir / "model.safetensors")
  expected_keys = set()
  for name, folder in hf_dirs.items():
    for key, value in load_state_dict(folder).items():
      got = export[PREFIXES[name] + key]
      assert got.dtype == value.dtype and np.array_equal(got, value), f"{name} {key} changed"
      expected_keys.add(PREFIXES[name] + key)
  head_keys = set(export) - expected_keys
  assert head_keys == {r.hf for r in convert.head_table(model_config("tiny"))}
  # Heads as DESIGN says: the pooler is a 2x2 average (0.25 * identity on each tap), bias 0; the
  # connector and fuser are fresh from --seed.
  d = model_config("tiny").vision.hidden_size
  pool = export["pooler.conv.weight"]  # torch [O, I, 2, 2]
  assert np.array_equal(pool, np.broadcast_to(0.25 * np.eye(d, dtype=np.float32)[:, :, None, None], pool.shape))
  assert not export["pooler.conv.bias"].any()
  fresh, other = convert.fresh_heads(model_config("tiny"), 3), convert.fresh_heads(model_config("tiny"), 4)
  assert np.array_equal(export["connector.fc1.weight"], fresh["connector"]["fc1"]["kernel"].T)
  assert np.array_equal(export["fuser.kv_proj.weight"], fresh["fuser"]["kv_proj"]["kernel"].T)
  assert not np.array_equal(fresh["connector"]["fc1"]["kernel"], other["connector"]["fc1"]["kernel"])
  # Tokenizer files travel HF folder -> model folder/tokenizer -> export.
  for name in ("tokenizer.json", "tokenizer_config.json"):
    src = (hf_dirs["qwen"] / name).read_bytes()
    assert (jax_dir / "tokenizer" / name).read_bytes() == src
    assert (export_dir / name).read_bytes() == src
  meta = json.loads((export_dir / "config.json").read_text())
  assert meta["architectures"] == [convert.ARCHITECTURE]
  assert convert.config_from_hf_dict(meta) == model_config("tiny")


@pytest.mark.parametrize("name", ["vision_config", "text_config", "cnn_config"])
def test_each_backbone_of_the_export_loads_alone(export_dir, tmp_path, name):
  """Strip the prefix, and transformers' own class loads the backbone with nothing missing or left over."""
  meta = json.loads((export_dir / "config.json").read_text())
  prefix = meta["backbones"][name]["prefix"]
  export = load_file(export_dir / "model.safetensors")
  alone = {k[len(prefix):]: v for k, v in export.items() if k.startswith(prefix)}
  save_file(alone, tmp_path / "model.safetensors", metadata={"format": "pt"})
  (tmp_path / "config.json").write_text(json.dumps(meta[name]))
  cls = BACKBONE_CLASSES[name]
  model, info = cls.from_pretrained(tmp_path, output_loading_info=True)
  assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
  state = model.state_dict()
  for key, value in alone.items():
    assert torch.equal(state[key], torch.from_numpy(value)), key
  # Strict load of the plain state dict as well (the tied LM head is the embedding itself).
  fresh = cls(type(model.config).from_dict(meta[name]))
  missing, unexpected = fresh.load_state_dict({k: torch.from_numpy(v) for k, v in alone.items()}, strict=False)
  assert not unexpected and set(missing) <= {"lm_head.weight"}


def test_torch_to_jax_round_trip_is_bit_exact(jax_dir, export_dir, tmp_path, capsys):
  _main("torch_to_jax", "--input", export_dir, "--out", tmp_path / "back", capsys=capsys)
  cfg_a, a = model_io.load_model(jax_dir)
  cfg_b, b = model_io.load_model(tmp_path / "back")
  assert cfg_a == cfg_b
  fa, fb = flatten(a), flatten(b)
  assert fa.keys() == fb.keys()
  for path in fa:
    assert fb[path].dtype == np.float32 and np.array_equal(fa[path], fb[path]), path
  assert (tmp_path / "back" / "tokenizer" / "tokenizer.json").is_file()


def test_bfloat16_export_and_forced_sharding(jax_dir, tmp_path, capsys):
  """A tiny shard limit makes several shards plus an index; both readers get the same tensors back."""
  _main("jax_to_torch", "--checkpoint", jax_dir, "--out", tmp_path / "bf16", "--dtype", "bfloat16",
        "--max-shard-gb", 50e3 / 1024 ** 3, capsys=capsys)
  index = json.loads((tmp_path / "bf16" / convert.SAFETENSORS_INDEX).read_text())
  shards = sorted(set(index["weight_map"].values()))
  assert len(shards) > 3 and shards == sorted(p.name for p in (tmp_path / "bf16").glob("model-*.safetensors"))
  assert not (tmp_path / "bf16" / "model.safetensors").exists()
  config, params = model_io.load_model(jax_dir)
  want = convert.export_state(params, config, dtype="bfloat16")
  got = load_state_dict(tmp_path / "bf16")
  assert got.keys() == want.keys() == index["weight_map"].keys()
  for k in want:
    assert got[k].dtype == want[k].dtype and np.array_equal(got[k], want[k]), k
  assert index["metadata"]["total_size"] == sum(v.nbytes for v in want.values())
  _main("torch_to_jax", "--input", tmp_path / "bf16", "--out", tmp_path / "back", capsys=capsys)
  _, back = model_io.load_model(tmp_path / "back")
  rounded = jax.tree.map(lambda x: np.asarray(x).astype(want["pooler.conv.bias"].dtype).astype(np.float32), params)
  assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(rounded)))


def _broken_export(export_dir, tmp_path, edit):
  out = tmp_path / "broken"
  out.mkdir()
  shutil.copy(export_dir / "config.json", out / "config.json")
  state = load_file(export_dir / "model.safetensors")
  edit(state)
  save_file(state, out / "model.safetensors", metadata={"format": "pt"})
  return out


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.pop("language_model.model.layers.1.self_attn.k_proj.bias"),
     r"missing key\(s\) \['language_model.model.layers.1.self_attn.k_proj.bias'\]"),
    (lambda s: s.__setitem__("fuser.out_proj.weight", np.zeros((4, 4), np.float32)),
     r"unexpected key\(s\) \['fuser.out_proj.weight'\]"),
    (lambda s: s.__setitem__("connector.fc1.weight", np.zeros((64, 31), np.float32)),
     r"key 'connector.fc1.weight' has shape \(64, 31\), expected \(64, 32\)"),
])
def test_torch_to_jax_rejects_a_mismatched_export(export_dir, tmp_path, capsys, edit, message):
  broken = _broken_export(export_dir, tmp_path, edit)
  err = _main("torch_to_jax", "--input", broken, "--out", tmp_path / "out", expect=2, capsys=capsys)
  assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
  assert re.search(message, err), err
  assert not (tmp_path / "out").exists()


def test_wrong_architecture_exits_2_naming_field_and_values(hf_dirs, tmp_path, capsys):
  """Tiny towers against the full preset, and a Qwen folder passed as SigLIP: one line each, exit 2."""
  out = _cli("hf_to_jax", "--siglip", hf_dirs["siglip"], "--qwen", hf_dirs["qwen"], "--convnext",
             hf_dirs["convnext"], "--out", tmp_path / "a", "--preset", "tinyvlm_0p6b", expect=2)
  assert "image_size is 32, but preset 'tinyvlm_0p6b' has image_size=384" in out.stderr
  assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1
  err = _main("hf_to_jax", "--siglip", hf_dirs["qwen"], "--qwen", hf_dirs["qwen"], "--convnext", hf_dirs["convnext"],
              "--out", tmp_path / "b", "--preset", "tiny", expect=2, capsys=capsys)
  assert "model_type is 'qwen2', expected 'siglip_vision_model' or 'siglip'" in err


def test_folders_without_weights_exit_2(hf_dirs, export_dir, tmp_path, capsys):
  empty = tmp_path / "no_weights"
  empty.mkdir()
  shutil.copy(export_dir / "config.json", empty / "config.json")
  out = _cli("torch_to_jax", "--input", empty, "--out", tmp_path / "x", expect=2)
  assert "no weights found" in out.stderr and "Traceback" not in out.stderr
  shutil.copy(hf_dirs["siglip"] / "config.json", tmp_path / "config.json")
  err = _main("hf_to_jax", "--siglip", tmp_path, "--qwen", hf_dirs["qwen"], "--convnext", hf_dirs["convnext"],
              "--out", tmp_path / "y", "--preset", "tiny", expect=2, capsys=capsys)
  assert "no weights found" in err
  err = _main("jax_to_torch", "--checkpoint", export_dir, "--out", tmp_path / "z", expect=2, capsys=capsys)
  assert "not a TinyVLM model folder" in err and "torch_to_jax.py" in err


def test_model_folder_save_load(tmp_path):
  cfg = model_config("tiny")
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), param_shapes(cfg))
  model_io.save_model(tmp_path / "m", params, cfg)
  model_io.save_model(tmp_path / "j", jax.tree.map(jax.numpy.asarray, params), cfg)  # jax arrays too
  for folder in ("m", "j"):
    got_cfg, got = model_io.load_model(tmp_path / folder)
    assert got_cfg == cfg
    assert all(isinstance(x, np.ndarray) and np.array_equal(x, y)
               for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(params)))
  with pytest.raises(model_io.ModelFolderError, match="already holds a model"):
    model_io.save_model(tmp_path / "m", params, cfg)
  other = model_config("demo")
  (tmp_path / "m" / "config.json").write_text(json.dumps({"format": model_io.FORMAT, "config": other.to_dict()}))
  with pytest.raises(model_io.ModelFolderError, match=r"parameter '[a-z_0-9/]+' has shape \(.+\), expected \(.+\)"):
    model_io.load_model(tmp_path / "m")
  with pytest.raises(model_io.ModelFolderError, match="no config.json"):
    model_io.load_model(tmp_path)


def test_backbone_folders_in_other_layouts(hf_dirs, tmp_path):
  """A whole SiglipModel (text tower ignored), ConvNextV2ForImageClassification ("convnextv2." prefix,
  classifier ignored), a sharded Qwen2 and a pytorch_model.bin give the same params as the plain towers."""
  cfg = model_config("tiny")
  torch.manual_seed(1)
  text = transformers.SiglipTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=4, vocab_size=99)
  full = transformers.SiglipModel(transformers.SiglipConfig(text_config=text.to_dict(),
                                                            vision_config=siglip.to_hf_config(cfg.vision).to_dict()))
  full.save_pretrained(tmp_path / "siglip_full")
  want = siglip.params_from_hf({k[len("vision_model."):]: v for k, v in full.state_dict().items()
                                if k.startswith("vision_model.")}, cfg.vision)
  convert.backbone_config(tmp_path / "siglip_full", "siglip", cfg.vision)
  got = convert.backbone_params(tmp_path / "siglip_full", "siglip", cfg.vision)
  assert jax.tree.all(jax.tree.map(np.array_equal, got, want))

  hf_cnn = convnext.to_hf_config(cfg.cnn)
  hf_cnn.num_labels = 5
  classifier = transformers.ConvNextV2ForImageClassification(hf_cnn)
  classifier.save_pretrained(tmp_path / "cnn_cls")
  convert.backbone_config(tmp_path / "cnn_cls", "convnext", cfg.cnn)
  got = convert.backbone_params(tmp_path / "cnn_cls", "convnext", cfg.cnn)
  assert jax.tree.all(jax.tree.map(np.array_equal, got, convnext.params_from_hf(classifier.convnextv2, cfg.cnn)))

  qwen = transformers.Qwen2ForCausalLM.from_pretrained(hf_dirs["qwen"])
  want = qwen2.params_from_hf(hf_dirs["qwen"], cfg.llm)
  qwen.save_pretrained(tmp_path / "qwen_sharded", max_shard_size="100KB")
  assert (tmp_path / "qwen_sharded" / "model.safetensors.index.json").is_file()
  (tmp_path / "qwen_bin").mkdir()
  shutil.copy(hf_dirs["qwen"] / "config.json", tmp_path / "qwen_bin" / "config.json")
  torch.save(qwen.state_dict(), tmp_path / "qwen_bin" / "pytorch_model.bin")
  for folder in ("qwen_sharded", "qwen_bin"):
    got = convert.backbone_params(tmp_path / folder, "qwen", cfg.llm)
    assert jax.tree.all(jax.tree.map(np.array_equal, got, want)), folder
