"""The grain pipeline: static shapes, mixing, the text/math schedule, exact resume, sharding, bad records."""

import collections
import io
import json
import logging
import struct
import zlib

import grain
import numpy as np
import pytest
from etils import epath
from PIL import Image

from tinyvlm_jax.data import chat, images, readers, synthetic
from tinyvlm_jax.data import pipeline as pipeline_lib
from tinyvlm_jax.data.pipeline import Pipeline, PipelineConfig, TooManyBadRecords
from tinyvlm_jax.data.tokenizer import load_tokenizer
from tinyvlm_jax.presets import model_config

CFG = model_config("tiny")
MAX_LEN = 96


def _config(**overrides) -> PipelineConfig:
  base = dict(batch_size=4, max_len=MAX_LEN, seed=0, num_epochs=1, max_bad_fraction=1.0, with_ids=True,
              text_every=0, math_every=0, drop_remainder=False)
  base.update(overrides)
  return PipelineConfig(**base)


def _pipeline(sources, process_index=0, process_count=1, **kw) -> Pipeline:
  extra = {k: kw.pop(k) for k in ("weights", "text_source", "math_source") if k in kw}
  return Pipeline(sources, model_cfg=CFG, config=_config(**kw), process_index=process_index,
                  process_count=process_count, **extra)


def _ids(batches) -> list[str]:
  return [i for b in batches for i in b["id"] if i]


def _take(p, n):
  return [next(p) for _ in range(n)]


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  root = tmp_path_factory.mktemp("data")
  llava = synthetic.write_llava(str(root / "llava"), "train", 24, seed=1, image_size=32)
  hermes = [{"id": f"hermes{i}", "conversations": [{"from": "human", "value": f"Say {i}."},
                                                    {"from": "gpt", "value": f"{i}"}]} for i in range(40)]
  (root / "hermes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in hermes))
  math = [{"id": f"math{i}", "instruction": f"What is {i} + 1?", "output": f"{i + 1}"} for i in range(30)]
  (root / "math.json").write_text(json.dumps(math))
  return {"llava": readers.llava_json(llava, name="llava"),
          "hermes": readers.sharegpt_text(root / "hermes.jsonl", name="hermes"),
          "math": readers.mathinstruct(root / "math.json", name="math")}


def test_static_shapes_right_padding_and_exact_rows(data):
  llava = data["llava"]
  tok = load_tokenizer()
  batches = list(_pipeline(llava, shuffle=False, batch_size=5))
  assert len(batches) == 5 and _ids(batches) == [llava[i]["id"] for i in range(24)]
  v, s, c = CFG.num_views, CFG.vision.image_size, CFG.cnn.image_size
  for b in batches:
    assert {k: (x.shape, x.dtype) for k, x in b.items() if k != "id"} == {
        "input_ids": ((5, MAX_LEN), np.int32), "loss_mask": ((5, MAX_LEN), bool),
        "attention_mask": ((5, MAX_LEN), np.int32), "positions": ((5, MAX_LEN), np.int32),
        "pixel_values": ((5, v, s, s, 3), np.float32), "cnn_pixel_values": ((5, c, c, 3), np.float32),
        "has_image": ((5,), bool), "example_key": ((5,), np.int32)}
    # NEFTune's per-record key: a hash of source and id, the same whichever process reads the record
    assert [int(k) for k in b["example_key"]] == [pipeline_lib.example_key("llava", r) if r else 0 for r in b["id"]]
    n = b["attention_mask"].sum(1)
    real = np.arange(MAX_LEN)[None] < n[:, None]
    np.testing.assert_array_equal(b["attention_mask"], real)  # right padding
    assert (b["input_ids"][~real] == tok.pad_id).all() and not b["loss_mask"][~real].any()
    np.testing.assert_array_equal(b["positions"], np.where(real, np.arange(MAX_LEN)[None], 0))
  last = batches[-1]  # 24 = 4 * 5 + 4: the last batch carries one empty row
  assert list(last["id"][-1:]) == [""] and not last["attention_mask"][-1].any() and not last["has_image"][-1]
  assert not last["pixel_values"][-1].any()

  # Every row is exactly encode_chat + preprocess of its record.
  for b in batches:
    for i, rid in enumerate(b["id"][:4]):
      rec = next(llava[k] for k in range(24) if llava[k]["id"] == rid)
      enc = chat.encode_chat(rec["messages"], tok, max_len=MAX_LEN, num_image_tokens=CFG.num_visual_tokens,
                             image_token_id=CFG.image_token_id)
      n = len(enc.ids)
      np.testing.assert_array_equal(b["input_ids"][i, :n], enc.ids)
      np.testing.assert_array_equal(b["loss_mask"][i, :n], enc.loss_mask)
      assert (b["input_ids"][i] == CFG.image_token_id).sum() == CFG.num_visual_tokens and b["has_image"][i]
      pix = images.preprocess(images.load_image(rec["image"], max_pixels=10 ** 6), CFG)
      np.testing.assert_array_equal(b["pixel_values"][i], pix["pixel_values"])
      np.testing.assert_array_equal(b["cnn_pixel_values"][i], pix["cnn_pixel_values"])


def test_mixing_by_weight_with_text_rows_zero_images(data):
  p = _pipeline([data["llava"], data["hermes"]], weights=[3, 1], num_epochs=None, batch_size=8)
  batches = _take(p, 10)
  ids = _ids(batches)
  frac = np.mean([i.startswith("hermes") for i in ids])
  assert abs(frac - 0.25) <= 0.03, frac
  for b in batches:
    text = np.array([i.startswith("hermes") for i in b["id"]])
    np.testing.assert_array_equal(b["has_image"], ~text)
    assert not b["pixel_values"][text].any() and not b["cnn_pixel_values"][text].any()
    assert all(b["pixel_values"][i].any() for i in np.flatnonzero(~text))
    assert not (b["input_ids"][text] == CFG.image_token_id).any()


def test_text_and_math_batches_on_schedule(data):
  p = _pipeline(data["llava"], text_source=data["hermes"], math_source=data["math"], num_epochs=None,
                text_every=2, math_every=3)
  expected = ["main", "text", "math", "text", "main", "math", "main", "text", "math", "text", "main", "math"]
  assert [p.stream_for_step(k) for k in range(12)] == expected
  prefix = {"text": "hermes", "math": "math"}
  for stream, b in zip(expected, _take(p, 12)):
    if stream == "main":
      assert b["has_image"].all() and not any(i.startswith(("hermes", "math")) for i in b["id"])
    else:
      assert not b["has_image"].any() and all(i.startswith(prefix[stream]) for i in b["id"])
  off = _pipeline(data["llava"], text_source=data["hermes"], math_source=data["math"], text_every=0, math_every=0)
  assert {off.stream_for_step(k) for k in range(200)} == {"main"}


def test_state_restores_exactly(data, tmp_path):
  bad_line = '{"id": "oops", \n'
  (tmp_path / "bad.jsonl").write_text(bad_line * 3)
  kw = dict(text_source=data["hermes"], math_source=data["math"], num_epochs=None, text_every=2, math_every=5)
  sources = [data["llava"], readers.jsonl(tmp_path / "bad.jsonl")]
  p = _pipeline(sources, weights=[8, 1], **kw)
  _take(p, 7)
  state = json.loads(json.dumps(p.get_state()))  # JSON-serialisable
  (tmp_path / "ckpt").mkdir()
  grain.checkpoint.CheckpointHandler().save(epath.Path(tmp_path / "ckpt"), item=p)  # grain's orbax handler
  stats = p.stats()
  assert stats["bad"]["invalid_json"] >= 1
  expected = _take(p, 6)
  q = _pipeline(sources, weights=[8, 1], **kw)
  q.set_state(state)
  assert q.stats() == stats
  _assert_batches_equal(_take(q, 6), expected)
  assert q.stats() == p.stats()
  r = grain.checkpoint.CheckpointHandler().restore(epath.Path(tmp_path / "ckpt"),
                                                   item=_pipeline(sources, weights=[8, 1], **kw))
  assert r.stats() == stats
  _assert_batches_equal(_take(r, 6), expected)


def test_state_restores_exactly_with_worker_processes(data):
  kw = dict(num_epochs=None, batch_size=3, worker_count=2)
  with _pipeline(data["llava"], **kw) as p:
    head = _take(p, 3)
    state = json.loads(json.dumps(p.get_state()))
    expected = _take(p, 4)
  with _pipeline(data["llava"], **kw) as q:
    q.set_state(state)
    _assert_batches_equal(_take(q, 4), expected)
  # The same records in the same order as without workers.
  _assert_batches_equal(_take(_pipeline(data["llava"], num_epochs=None, batch_size=3), 7), head + expected)


def test_shards_are_disjoint_and_cover_the_data(data):
  shards = [_ids(_pipeline(data["llava"], process_index=i, process_count=2, batch_size=5)) for i in range(2)]
  assert len(shards[0]) == len(shards[1]) == 12
  assert not set(shards[0]) & set(shards[1])
  assert sorted(shards[0] + shards[1]) == sorted(data["llava"][i]["id"] for i in range(24))


def _png_header_only(w, h) -> bytes:
  def chunk(tag, payload):
    return struct.pack(">I", len(payload)) + tag + payload + struct.pack(">I", zlib.crc32(tag + payload))
  ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
  return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


BAD_KINDS = ("corrupt_image", "missing_image", "invalid_json", "empty_conversation", "bad_role",
             "no_assistant_turn", "too_long", "zero_size_image", "image_too_large")


@pytest.fixture(scope="module")
def bad_corpus(tmp_path_factory):
  """30 good records (a fifth text-only) and one record of every bad kind, as JSONL with image paths."""
  root = tmp_path_factory.mktemp("bad")

  def png(name, size, value=128):
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(root / name)
    return name

  def qa(rid, image, question="What colour?", answer="grey"):
    row = {"id": rid, "question": question, "answer": answer}
    if image is not None:
      row["image"] = image
    return json.dumps(row)

  def conv(rid, turns):
    return json.dumps({"id": rid, "image": "good0.png", "conversations": [{"from": f, "value": v} for f, v in turns]})

  lines = [qa(f"good{i}", None if i % 5 == 4 else png(f"good{i}.png", 24, 8 * i)) for i in range(30)]
  (root / "corrupt.png").write_bytes(b"this is not an image")
  (root / "zero.png").write_bytes(_png_header_only(0, 5))
  bad = {
      "corrupt_image": qa("bad_corrupt", "corrupt.png"),
      "missing_image": qa("bad_missing", "no/such/file.png"),
      "invalid_json": '{"id": "bad_json", "question": "unterminated',
      "empty_conversation": conv("bad_empty", []),
      "bad_role": conv("bad_role", [("human", "<image>\nHi"), ("wizard", "abracadabra")]),
      "no_assistant_turn": conv("bad_noanswer", [("human", "<image>\nHi")]),
      "too_long": qa("bad_long", "good0.png", question="word " * 400),
      "zero_size_image": qa("bad_zero", "zero.png"),
      "image_too_large": qa("bad_large", png("large.png", 80)),
  }
  assert tuple(bad) == BAD_KINDS
  for k, line in enumerate(bad.values()):  # spread the bad ones through the file: lines 2, 5, 8, ...
    lines.insert(3 * k + 1, line)
  (root / "corpus.jsonl").write_text("\n".join(lines) + "\n")
  return readers.jsonl(root / "corpus.jsonl", name="corpus")


def test_bad_records_counted_exactly_and_good_ones_once(bad_corpus, caplog):
  caplog.set_level(logging.WARNING, logger="tinyvlm_jax.data.pipeline")
  kw = dict(max_pixels=64 * 64, batch_size=4)
  p = _pipeline(bad_corpus, **kw)
  ids = _ids(list(p))
  assert collections.Counter(ids) == {f"good{i}": 1 for i in range(30)}  # every good record once per epoch
  assert p.stats() == {"seen": 39, "bad": {k: 1 for k in BAD_KINDS}}
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert len(warnings) == len(BAD_KINDS)  # once per reason, naming the record
  for reason, rid in zip(BAD_KINDS, ["bad_corrupt", "bad_missing", "corpus:8", "bad_empty", "bad_role",
                                     "bad_noanswer", "bad_long", "bad_zero", "bad_large"]):
    assert sum(f"({reason})" in w and rid in w for w in warnings) == 1, (reason, warnings)

  two = _pipeline(bad_corpus, num_epochs=2, **kw)
  assert collections.Counter(_ids(list(two))) == {f"good{i}": 2 for i in range(30)}
  assert two.stats() == {"seen": 78, "bad": {k: 2 for k in BAD_KINDS}}


def test_bad_fraction_guard_raises_with_counts(bad_corpus):
  kw = dict(max_pixels=64 * 64, batch_size=4, max_bad_fraction=0.1)
  early = _pipeline(bad_corpus, min_records_for_bad_check=10, shuffle=False, **kw)  # 3 bad among the first 10
  with pytest.raises(TooManyBadRecords, match=r"of 10 records were bad") as e:
    list(early)
  assert e.value.seen == 10 and sum(e.value.counts.values()) > 1
  # Below the minimum the fraction is checked at the end of the data: all nine kinds listed.
  late = _pipeline(bad_corpus, min_records_for_bad_check=1000, **kw)
  with pytest.raises(TooManyBadRecords) as e:
    list(late)
  assert e.value.seen == 39 and e.value.counts == {k: 1 for k in BAD_KINDS}
  assert all(f"{k}: 1" in str(e.value) for k in BAD_KINDS)
  # At 9 / 39 = 23 % a guard set at 25 % lets the epoch through.
  assert len(_ids(_pipeline(bad_corpus, min_records_for_bad_check=1000, **{**kw, "max_bad_fraction": 0.25}))) == 30


def test_config_from_mapping_rejects_unknown_fields():
  assert PipelineConfig.from_dict({"batch_size": 2, "text_every": 0}).batch_size == 2
  with pytest.raises(ValueError, match="unknown field"):
    PipelineConfig.from_dict({"batch_sise": 2})


def test_stage1_captions_from_tfds(tmp_path):
  from tinyvlm_jax.data import tfds_synthetic
  cfg = tfds_synthetic.prepare(tmp_path, config="tiny").builder_config
  captions = {ex["id"]: ex["caption"] for ex in synthetic.generate_split("train", cfg.num_train, cfg.seed,
                                                                          image_size=cfg.image_size)}
  src = readers.TfdsSource(tfds_synthetic.data_source(tmp_path, "train", config="tiny"), name="synth", mode="caption")
  tok = load_tokenizer()
  p = _pipeline(src, caption_only=True, batch_size=8)
  batches = list(p)
  assert sorted(_ids(batches)) == sorted(captions) and p.stats()["bad"] == {}
  for b in batches:
    assert b["has_image"].all()
    for ids, mask, rid in zip(b["input_ids"], b["loss_mask"], b["id"]):
      assert tok.decode(ids[mask]) == captions[rid] + "<|im_end|>"  # the caption alone carries the loss
  # Text-only records cannot be captions: each is dropped as "no_image".
  (tmp_path / "m.json").write_text(json.dumps([{"instruction": "1+1?", "output": "2"}] * 3))
  q = _pipeline(readers.mathinstruct(tmp_path / "m.json"), caption_only=True)
  assert _ids(list(q)) == [] and q.stats() == {"seen": 3, "bad": {"no_image": 3}}
