"""Caption-tag pretraining of the vision tower, and the demo flow that starts stage 1 from it."""

import dataclasses
import json
import os
import shutil

import jax
import ml_collections
import numpy as np
import pytest

from tinyvlm_jax import model_io
from tinyvlm_jax.models.tinyvlm import init_params
from tinyvlm_jax.presets import model_config
from tinyvlm_jax.train import demo, loop, vision_pretrain
from tinyvlm_jax.train.testing import byte_tokenizer, tiny_stage_config

CFG = dataclasses.replace(model_config("tiny"), use_cnn=False)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  root = tmp_path_factory.mktemp("pretrain_data")
  return demo.prepare_data(str(root), num_train=480, num_test=120, image_size=32, seed=0)


def _constant_f1(train_json, test_json):
  """Micro-F1 of the best constant guess: every tag present in over half of the train captions."""
  def tag_sets(path):
    with open(path) as f:
      return [vision_pretrain.caption_tags(vision_pretrain._caption_of(r, path)) for r in json.load(f)]
  train, test = tag_sets(train_json), tag_sets(test_json)
  vocab = sorted(set().union(*train))
  guess = {t for t in vocab if sum(t in s for s in train) > len(train) / 2}
  logits = np.array([[1.0 if t in guess else -1.0 for t in vocab] for _ in test])
  targets = np.array([[1.0 if t in s else 0.0 for t in vocab] for s in test])
  return vision_pretrain.tag_f1(logits, targets)


PCFG = vision_pretrain.PretrainConfig(steps=150, batch_size=32, lr=3e-3, warmup_steps=10)


@pytest.fixture(scope="module")
def pretrained(data, tmp_path_factory):
  """150 steps on the 480 train images -> (model folder, results)."""
  out = str(tmp_path_factory.mktemp("pretrained") / "tower")
  return out, vision_pretrain.pretrain(data["captions"], out, CFG, PCFG, heldout_json=data["test"], log=lambda s: None)


def test_pretraining_learns_caption_tags_and_writes_a_model_folder(data, pretrained):
  out, result = pretrained
  pcfg, logs = PCFG, []
  assert result["last_loss"] < 0.6 * result["first_loss"], result
  baseline = _constant_f1(data["captions"], data["test"])
  assert result["heldout_tag_f1"] > baseline + 0.1, (result["heldout_tag_f1"], baseline)
  assert {"red", "circle", "left", "two", "cat"} <= set(result["tags"])

  config, params = model_io.load_model(out)
  assert config == CFG
  fresh = jax.device_get(init_params(CFG, jax.random.PRNGKey(pcfg.seed)))
  trained = jax.tree.leaves(jax.tree.map(lambda a, b: not np.array_equal(a, b), params["vision"], fresh["vision"]))
  assert all(trained)  # every tower weight moved; the other modules are their random init
  for name in ("pooler", "connector", "llm"):
    assert all(jax.tree.leaves(jax.tree.map(np.array_equal, params[name], fresh[name])))

  # A finished pretraining is reused, not repeated.
  again = vision_pretrain.pretrain(data["captions"], out, CFG, pcfg, log=logs.append)
  assert again == json.load(open(os.path.join(out, vision_pretrain.RESULTS_FILE)))
  assert "finished earlier" in logs[-1]
  with pytest.raises(ValueError, match="pretraining of 150 steps, the config asks for 20"):
    vision_pretrain.pretrain(data["captions"], out, CFG, dataclasses.replace(pcfg, steps=20), log=logs.append)


def test_bad_records_are_skipped_and_counted(data, tmp_path):
  with open(data["captions"]) as f:
    rows = json.load(f)[:6]
  rows[1]["image"] = "images/missing.png"
  del rows[2]["conversations"]
  path = os.path.join(os.path.dirname(data["captions"]), "bad_captions.json")
  with open(path, "w") as f:
    json.dump(rows, f)
  logs = []
  views, captions = vision_pretrain.load_captioned_images(path, CFG, log=logs.append)
  assert views.shape == (4, CFG.num_views, 32, 32, 3) and views.dtype == np.uint8 and len(captions) == 4
  assert any("missing.png" in m for m in logs) and any(rows[2]["id"] in m for m in logs)
  assert "2 of 6 records" in logs[-1]


def test_demo_flow_starts_stage1_from_the_pretrained_tower(pretrained, tmp_path):
  """loop.run with a demo section: data, pretraining, stage 1, evaluation, demo_results.json (the later
  stages are ordinary stages; left out to keep the test short)."""
  tok = byte_tokenizer(str(tmp_path / "tokenizer"))
  s1 = tiny_stage_config("{workdir}/data/captions.json", tok, total_steps=2, every_steps=2)
  s1.stage = "stage1"
  s1.init.params = "{workdir}/vision_pretrain"
  s1.trainable = ("pooler", "connector")
  s1.data.caption_only = True
  s1.loss.max_targets = 0  # byte-level captions: logits everywhere (a 512-word vocabulary)
  cfg = ml_collections.ConfigDict()
  cfg.stages = ml_collections.ConfigDict({"stage1": s1})
  cfg.stage_order = ("stage1",)
  cfg.demo = ml_collections.ConfigDict(dict(data_dir="{workdir}/data", num_train=24, num_test=10, image_size=32,
                                            seed=0, max_new_tokens=3, eval_batch_size=5))
  cfg.demo.vision_pretrain = ml_collections.ConfigDict(dataclasses.asdict(PCFG))
  workdir = str(tmp_path / "demo")
  # The fixture's finished pretraining sits where the demo writes its own: loop.run reuses it (the
  # pretraining itself is tested above; compiling it again would double this test's time).
  shutil.copytree(pretrained[0], os.path.join(workdir, demo.PRETRAINED_TOWER_DIR))
  loop.run(cfg, workdir, progress=False, log=lambda s: None)

  with open(os.path.join(workdir, demo.RESULTS_FILE)) as f:
    results = json.load(f)
  assert list(results)[:3] == ["accuracy", "per_type", "seconds"] and results["num_examples"] == 10
  assert 0.0 <= results["accuracy"] <= 1.0 and results["vision_pretrain"]["steps"] == PCFG.steps
  _, pretrained = model_io.load_model(os.path.join(workdir, "vision_pretrain"))
  _, stage1 = model_io.load_model(os.path.join(workdir, "stage1", "model"))
  same = jax.tree.map(np.array_equal, pretrained["vision"], stage1["vision"])
  assert all(jax.tree.leaves(same))  # stage 1 freezes the pretrained tower bit for bit
  fresh = jax.device_get(init_params(CFG, jax.random.PRNGKey(s1.seed)))
  assert not any(jax.tree.leaves(jax.tree.map(np.array_equal, fresh["vision"], stage1["vision"])))  # not a fresh one
  with open(os.path.join(workdir, "data", "train.json")) as f:
    assert max(len(r["conversations"]) for r in json.load(f)) == 6  # all questions per training image
