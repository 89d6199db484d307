"""Readers: every training-data layout -> normalised records, random access equal to streaming."""

import io
import json
import os
import pickle

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tinyvlm_jax.data import readers, synthetic
from tinyvlm_jax.data.readers import BadRecord


def _png(value: int, size: int = 8) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(buf, format="PNG")
  return buf.getvalue()


def _pixels(image) -> np.ndarray:
  return np.asarray(Image.open(io.BytesIO(image) if isinstance(image, bytes) else image).convert("RGB"))


def _check_random_access(src):
  """__getitem__ over the index gives exactly what streaming gives, also after pickling (grain workers)."""
  streamed = list(src)
  assert len(src) == len(streamed)
  assert [src[i] for i in range(len(src))] == streamed
  clone = pickle.loads(pickle.dumps(src))
  assert [clone[i] for i in reversed(range(len(clone)))] == streamed[::-1]
  return streamed


def test_llava_json_with_image_root(tmp_path):
  json_path = synthetic.write_llava(str(tmp_path / "llava"), "train", 6, seed=3, image_size=16)
  expected = synthetic.generate_split("train", 6, seed=3, image_size=16)
  src = readers.llava_json(json_path, name="llava")
  recs = _check_random_access(src)
  assert len(recs) == 6
  with open(json_path) as f:
    raw = json.load(f)
  for rec, row, ex in zip(recs, raw, expected):
    assert rec["id"] == str(row["id"]) and rec["source"] == "llava"
    assert rec["image"] == os.path.join(os.path.dirname(json_path), row["image"])
    np.testing.assert_array_equal(_pixels(rec["image"]), ex["image"])
    roles = [m["role"] for m in rec["messages"]]
    assert roles[0] == "user" and roles[1] == "assistant"
    assert readers.IMAGE_PLACEHOLDER in rec["messages"][0]["content"]
    assert [m["content"] for m in rec["messages"]] == [t["value"] for t in row["conversations"]]
  # An explicit image root replaces the JSON file's folder.
  other = readers.llava_json(json_path, image_root="/elsewhere")
  assert other[0]["image"] == os.path.join("/elsewhere", raw[0]["image"])


def _cauldron_table(rows):
  image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
  text = pa.struct([("user", pa.string()), ("assistant", pa.string()), ("source", pa.string())])
  schema = pa.schema([("images", pa.list_(image)), ("texts", pa.list_(text))])
  return pa.Table.from_pylist(rows, schema=schema)


def test_cauldron_parquet_across_files_and_row_groups(tmp_path):
  rows = [{"images": [{"bytes": _png(10 * i), "path": None}],
           "texts": [{"user": f"q{i}a", "assistant": f"a{i}a", "source": "vqa"},
                     {"user": f"q{i}b", "assistant": f"a{i}b", "source": "vqa"}]} for i in range(7)]
  rows[3]["texts"][0]["user"] = "<image>What is here?"  # already has the placeholder: left as is
  rows[5]["images"] = []  # text-only row
  pq.write_table(_cauldron_table(rows[:5]), tmp_path / "a.parquet", row_group_size=2)  # groups 2, 2, 1
  pq.write_table(_cauldron_table(rows[5:]), tmp_path / "b.parquet", row_group_size=1)
  src = readers.cauldron_parquet([tmp_path / "a.parquet", tmp_path / "b.parquet"], name="cauldron")
  recs = _check_random_access(src)
  assert len(recs) == 7
  for i, rec in enumerate(recs):
    assert rec["id"] == f"cauldron:{i}"
    assert [m["role"] for m in rec["messages"]] == ["user", "assistant"] * 2
    assert [m["content"] for m in rec["messages"]][1:] == [f"a{i}a", f"q{i}b", f"a{i}b"]
    if i == 5:
      assert rec["image"] is None and rec["messages"][0]["content"] == "q5a"
    else:
      assert _pixels(rec["image"])[0, 0, 0] == 10 * i
  assert recs[0]["messages"][0]["content"] == "<image>\nq0a"
  assert recs[3]["messages"][0]["content"] == "<image>What is here?"


def test_lnqa_parquet_and_bad_rows(tmp_path):
  image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
  qa = pa.struct([("question", pa.string()), ("answer", pa.string())])
  schema = pa.schema([("image", image), ("qa", pa.list_(qa))])
  (tmp_path / "img.png").write_bytes(_png(77))
  rows = [{"image": {"bytes": _png(5), "path": "x.png"}, "qa": [{"question": "Q1", "answer": "A1"},
                                                                  {"question": "Q2", "answer": "A2"}]},
          {"image": {"bytes": None, "path": "img.png"}, "qa": [{"question": "Q3", "answer": "A3"}]},
          {"image": {"bytes": _png(6), "path": None}, "qa": None},
          {"image": {"bytes": _png(7), "path": None}, "qa": [{"question": None, "answer": "A4"}]}]
  pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp_path / "lnqa.parquet")
  recs = _check_random_access(readers.lnqa_parquet(tmp_path / "lnqa.parquet", image_root=tmp_path, name="lnqa"))
  assert recs[0]["messages"] == [{"role": "user", "content": "<image>\nQ1"}, {"role": "assistant", "content": "A1"},
                                 {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}]
  assert _pixels(recs[0]["image"])[0, 0, 0] == 5  # bytes win over the path
  assert recs[1]["image"] == str(tmp_path / "img.png") and _pixels(recs[1]["image"])[0, 0, 0] == 77
  assert recs[2] == BadRecord("lnqa:2", "bad_format", recs[2].detail) and "'qa'" in recs[2].detail
  assert isinstance(recs[3], BadRecord) and recs[3].reason == "bad_format" and "'question'" in recs[3].detail


def test_openhermes_and_mathinstruct_json_and_jsonl(tmp_path):
  hermes = [{"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                               {"from": "gpt", "value": "Hello"}]},
            {"id": "h1", "conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]},
            {"conversations": [{"from": "wizard", "value": "x"}, {"from": "gpt", "value": "y"}]}]
  (tmp_path / "hermes.json").write_text(json.dumps(hermes))
  recs = _check_random_access(readers.sharegpt_text(tmp_path / "hermes.json", name="hermes"))
  assert recs[0] == {"id": "hermes:0", "source": "hermes", "image": None,
                     "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                                  {"role": "assistant", "content": "Hello"}]}
  assert recs[1]["id"] == "h1" and recs[1]["messages"][1] == {"role": "assistant", "content": "4"}
  assert isinstance(recs[2], BadRecord) and (recs[2].id, recs[2].reason) == ("hermes:2", "bad_role")

  math = [{"instruction": "Solve x+1=3.", "output": "x=2"}, {"instruction": "Add 1 and 1."}]
  (tmp_path / "math.json").write_text(json.dumps(math))
  (tmp_path / "math.jsonl").write_text("".join(json.dumps(r) + "\n\n" for r in math))  # blank lines are skipped
  for path in ("math.json", "math.jsonl"):
    src = readers.mathinstruct(tmp_path / path, name="math")
    assert isinstance(src, readers.JsonlSource if path.endswith("l") else readers.JsonListSource)
    recs = _check_random_access(src)
    assert recs[0]["messages"] == [{"role": "user", "content": "Solve x+1=3."},
                                   {"role": "assistant", "content": "x=2"}]
    assert isinstance(recs[1], BadRecord) and recs[1].reason == "bad_format" and "'output'" in recs[1].detail


def test_jsonl_with_image_column_and_invalid_lines(tmp_path):
  (tmp_path / "imgs").mkdir()
  (tmp_path / "imgs" / "a.png").write_bytes(_png(1))
  lines = [json.dumps({"id": "q1", "image": "imgs/a.png", "question": "Colour?", "answer": "black"}),
           json.dumps({"id": "c1", "image": "imgs/a.png", "conversations": [
               {"from": "human", "value": "<image>\nShape?"}, {"from": "gpt", "value": "square"}]}),
           '{"id": "broken", "question": ',
           json.dumps({"id": "t1", "question": "No image?", "answer": "none"}),
           json.dumps(["not", "an", "object"])]
  (tmp_path / "set.jsonl").write_text("\n".join(lines) + "\n")
  recs = _check_random_access(readers.jsonl(tmp_path / "set.jsonl"))
  assert recs[0] == {"id": "q1", "source": "set.jsonl", "image": str(tmp_path / "imgs" / "a.png"),
                     "messages": [{"role": "user", "content": "<image>\nColour?"},
                                  {"role": "assistant", "content": "black"}]}
  assert recs[1]["messages"][0]["content"] == "<image>\nShape?" and recs[1]["image"] == recs[0]["image"]
  assert isinstance(recs[2], BadRecord) and (recs[2].id, recs[2].reason) == ("set.jsonl:3", "invalid_json")
  assert recs[3]["image"] is None and recs[3]["messages"][0]["content"] == "No image?"
  assert isinstance(recs[4], BadRecord) and (recs[4].id, recs[4].reason) == ("set.jsonl:5", "bad_format")
  with pytest.raises(IndexError, match="out of range"):
    readers.jsonl(tmp_path / "set.jsonl")[5]


def test_file_errors_name_the_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.json"):
    readers.llava_json(tmp_path / "nope.json")
  (tmp_path / "obj.json").write_text('{"a": 1}')
  (tmp_path / "half.json").write_text('[{"a": 1}, ')
  with pytest.raises(ValueError, match="obj.json holds a JSON dict, expected a list"):
    readers.JsonListSource(tmp_path / "obj.json", readers.parse_sharegpt)
  with pytest.raises(ValueError, match="half.json is not valid JSON"):
    readers.sharegpt_text(tmp_path / "half.json")


def test_tfds_builder_round_trip(tmp_path):
  from tinyvlm_jax.data import tfds_synthetic
  builder = tfds_synthetic.prepare(tmp_path, config="tiny")
  cfg = builder.builder_config
  assert os.path.isdir(tmp_path / "tinyvlm_synthetic" / "tiny" / "1.0.0")
  assert builder.info.splits["train"].num_examples == cfg.num_train
  expected = {ex["id"]: ex for ex in synthetic.generate_split("train", cfg.num_train, cfg.seed,
                                                              image_size=cfg.image_size)}

  decoded = tfds_synthetic.data_source(tmp_path, "train", config="tiny", decode_image=True)
  ex = decoded[0]
  ref = expected[ex["id"].decode()]
  np.testing.assert_array_equal(ex["image"], ref["image"])
  assert ex["question"] == ref["question"].encode()  # Text features come back as bytes

  src = readers.TfdsSource(tfds_synthetic.data_source(tmp_path, "train", config="tiny"), name="synthetic")
  recs = _check_random_access(src)
  assert sorted(r["id"] for r in recs) == sorted(expected)
  for rec in recs:
    ref = expected[rec["id"]]
    assert isinstance(rec["image"], bytes)  # PNG bytes, decoded later by the pipeline
    np.testing.assert_array_equal(_pixels(rec["image"]), ref["image"])
    assert rec["messages"] == [{"role": "user", "content": "<image>\n" + ref["question"]},
                               {"role": "assistant", "content": ref["answer"]}]
  captions = readers.TfdsSource(decoded, name="synthetic", mode="caption")  # decoded arrays are re-encoded
  rec = captions[1]
  assert rec["messages"][1]["content"] == expected[rec["id"]]["caption"]
  np.testing.assert_array_equal(_pixels(rec["image"]), expected[rec["id"]]["image"])
