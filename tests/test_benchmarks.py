"""Benchmark readers (parquet with PNG bytes, JSONL with image paths), prompts and scores."""

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tinyvlm_jax.eval import benchmarks as bm

SUFFIX = "\nAnswer the question using a single word or phrase."
MC_SUFFIX = "\n\nAnswer with the option's letter from the given choices directly."


def _png(seed: int) -> tuple[bytes, np.ndarray]:
  pixels = np.random.default_rng(seed).integers(0, 256, (6, 5, 3), dtype=np.uint8)
  buf = io.BytesIO()
  Image.fromarray(pixels).save(buf, format="PNG")
  return buf.getvalue(), pixels


def _pixels(image) -> np.ndarray:
  return np.asarray(Image.open(io.BytesIO(image) if isinstance(image, bytes) else image).convert("RGB"))


def _hf_image(data: bytes) -> dict:
  return {"bytes": data, "path": None}


def _write_parquet(path, rows: dict, row_group_size: int | None = None):
  pq.write_table(pa.table(rows), path, row_group_size=row_group_size)


def _write_jsonl(path, records):
  path.write_text("".join(json.dumps(r) + "\n" for r in records))


# ------------------------------------------------------------------------------------------
# VQAv2
# ------------------------------------------------------------------------------------------

def _vqa_answers(answers):
  return [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(answers)]


def test_vqav2_parquet(tmp_path):
  pngs = [_png(i) for i in range(3)]
  rows = {
      "question_id": [101, 102, 103],
      "question": ["What color is the bus?", "How many dogs are there?", "What animal is this?"],
      "image": [_hf_image(p[0]) for p in pngs],
      "answers": [_vqa_answers(["yellow"] * 10), _vqa_answers(["two", "2"] + ["three"] * 8),
                  _vqa_answers(["cat"] * 10)],
      "multiple_choice_answer": ["yellow", "3", "cat"],
      "answer_type": ["other", "number", "other"],
  }
  f = tmp_path / "vqav2.parquet"
  _write_parquet(f, rows, row_group_size=1)
  items = bm.read_benchmark("vqav2", str(f))
  assert [it.id for it in items] == ["101", "102", "103"]
  assert items[0].prompt == "What color is the bus?" + SUFFIX
  assert items[1].gold == ["two", "2"] + ["three"] * 8
  for it, (_, pixels) in zip(items, pngs):
    assert len(it.images) == 1
    np.testing.assert_array_equal(_pixels(it.images[0]), pixels)
  assert [it.id for it in bm.read_benchmark("vqav2", str(f), limit=2)] == ["101", "102"]

  # 1: all humans "yellow", pred "Yellow." -> 1.0; 2: 2 of 10 say 2 -> 0.6; 3: 0.
  scores = bm.score_benchmark("vqav2", items, {"101": "Yellow.", "102": "2", "103": "dog"})
  assert scores["accuracy"] == pytest.approx(100 * 1.6 / 3)
  assert scores["answer_types"] == {"other": {"accuracy": pytest.approx(50.0), "n": 2},
                                    "number": {"accuracy": pytest.approx(60.0), "n": 1}}
  assert scores["n"] == 3


def test_vqav2_jsonl_with_paths_and_string_answers(tmp_path):
  (tmp_path / "imgs").mkdir()
  data, pixels = _png(7)
  (tmp_path / "imgs" / "a.png").write_bytes(data)
  _write_jsonl(tmp_path / "mine.jsonl", [
      {"question_id": "q1", "question": "Is it sunny?", "image": "imgs/a.png", "answers": ["yes"] * 9 + ["no"]},
  ])
  (item,) = bm.read_benchmark("vqav2", str(tmp_path / "mine.jsonl"))
  assert item.images == [str(tmp_path / "imgs" / "a.png")]
  np.testing.assert_array_equal(_pixels(item.images[0]), pixels)
  assert item.prompt == "Is it sunny?" + SUFFIX
  # 9 of 10 say yes: the 9 see 8 others (1.0 each), the "no" human sees 9 (1.0) -> 1.0;
  # pred "no": the 9 see 1 (1/3), the "no" human sees 0 -> 0.3.
  assert bm.score_benchmark("vqav2", [item], {"q1": "Yes"})["accuracy"] == pytest.approx(100.0)
  assert bm.score_benchmark("vqav2", [item], {"q1": "no"})["accuracy"] == pytest.approx(30.0)


def test_folder_of_shards_in_name_order(tmp_path):
  for shard, ids in (("b-00001.parquet", [3, 4]), ("a-00000.parquet", [1, 2])):
    _write_parquet(tmp_path / shard, {
        "question_id": ids, "question": [f"q{i}" for i in ids], "image": [_png(i)[0] for i in ids],
        "answers": [["x"] * 10 for _ in ids]})
  assert [it.id for it in bm.read_benchmark("textvqa", str(tmp_path))] == ["1", "2", "3", "4"]
  assert [it.id for it in bm.read_benchmark("textvqa", str(tmp_path), limit=3)] == ["1", "2", "3"]


# ------------------------------------------------------------------------------------------
# TextVQA
# ------------------------------------------------------------------------------------------

def test_textvqa_parquet_raw_image_bytes(tmp_path):
  pngs = [_png(10), _png(11)]
  _write_parquet(tmp_path / "textvqa.parquet", {
      "question_id": [1, 2],
      "question": ["what does the sign SAY?", "which exit is shown?"],
      "image": [p[0] for p in pngs],  # binary column, no struct
      "answers": [["Stop"] * 3 + ["stop sign"] * 7, ["exit"] + ["EXIT 5"] * 9],
      "ocr_tokens": [["STOP"], ["EXIT", "5"]],
  })
  items = bm.read_benchmark("textvqa", str(tmp_path / "textvqa.parquet"))
  # str.capitalize(), as lmms-eval: first letter up, the rest lowercased.
  assert items[0].prompt == "What does the sign say?" + SUFFIX
  assert items[1].prompt == "Which exit is shown?" + SUFFIX
  np.testing.assert_array_equal(_pixels(items[1].images[0]), pngs[1][1])
  # 1: "STOP" -> "stop" said by 3: (3 * 2/3 + 7 * 1) / 10 = 0.9; 2: 1 human -> 0.3.
  scores = bm.score_benchmark("textvqa", items, {"1": "STOP", "2": "exit"})
  assert scores == {"accuracy": pytest.approx(60.0), "n": 2}


# ------------------------------------------------------------------------------------------
# POPE
# ------------------------------------------------------------------------------------------

def test_pope_parquet(tmp_path):
  n = 5
  _write_parquet(tmp_path / "pope.parquet", {
      "id": [str(i) for i in range(n)],
      "question_id": [1, 2, 3, 1, 2],  # repeats across categories, as in lmms-lab/POPE
      "question": [" Is there a dog in the image? "] + ["Is there a cat in the image?"] * 4,
      "answer": ["yes", "yes", "no", "no", "no"],
      "image": [_hf_image(_png(i)[0]) for i in range(n)],
      "category": ["random"] * 3 + ["adversarial"] * 2,
  })
  items = bm.read_benchmark("pope", str(tmp_path / "pope.parquet"))
  assert [it.id for it in items] == ["0", "1", "2", "3", "4"]
  assert items[0].prompt == "Is there a dog in the image?" + SUFFIX
  assert [it.meta["category"] for it in items] == ["random"] * 3 + ["adversarial"] * 2
  preds = {"0": "Yes, there is.", "1": "No.", "2": "yes", "3": "No, there is not.", "4": "There is no cat"}
  s = bm.score_benchmark("pope", items, preds)
  # random: TP 1, FN 1, FP 1; adversarial: TN 2; overall: TP 1, FP 1, FN 1, TN 2.
  assert s["random"] == {"accuracy": pytest.approx(100 / 3), "precision": pytest.approx(50.0),
                         "recall": pytest.approx(50.0), "f1": pytest.approx(50.0),
                         "yes_ratio": pytest.approx(200 / 3), "n": 3}
  assert s["adversarial"] == {"accuracy": 100.0, "precision": 0.0, "recall": 0.0, "f1": 0.0,
                              "yes_ratio": 0.0, "n": 2}
  assert s["overall"] == {"accuracy": pytest.approx(60.0), "precision": pytest.approx(50.0),
                          "recall": pytest.approx(50.0), "f1": pytest.approx(50.0),
                          "yes_ratio": pytest.approx(40.0), "n": 5}
  assert s["mean"]["f1"] == pytest.approx(25.0)
  assert s["n"] == 5


def test_duplicate_ids_fall_back_to_row_numbers(tmp_path):
  _write_jsonl(tmp_path / "pope.jsonl", [
      {"question_id": 1, "question": "Is there a cat?", "answer": "no", "image": "x.png", "category": c}
      for c in ("random", "popular")])
  items = bm.read_benchmark("pope", str(tmp_path / "pope.jsonl"))
  assert [(it.id, it.meta["source_id"]) for it in items] == [("0", "1"), ("1", "1")]


# ------------------------------------------------------------------------------------------
# MMMU
# ------------------------------------------------------------------------------------------

def _mmmu_rows(pngs):
  return {
      "id": ["validation_Art_1", "validation_Art_2", "validation_Math_1"],
      "question": ["Compare <image 2> with <image 1>. Which color dominates?",
                   "What is shown in <image 1>?", "How many sides has the shape in <image 1>?"],
      "options": ["['red', 'blue', 'green']", "['a <image 3>', 'a tree']", "[]"],
      "answer": ["B", "A", "42"],
      "image_1": [_hf_image(pngs[0][0]), _hf_image(pngs[3][0]), _hf_image(pngs[4][0])],
      "image_2": [_hf_image(pngs[1][0]), None, None],
      "image_3": [None, _hf_image(pngs[2][0]), None],
      "image_4": pa.array([None, None, None], pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
      "question_type": ["multiple-choice", "multiple-choice", "open"],
      "subfield": ["Painting", "Painting", "Geometry"],
  }


def test_mmmu_parquet(tmp_path):
  pngs = [_png(20 + i) for i in range(5)]
  _write_parquet(tmp_path / "mmmu.parquet", _mmmu_rows(pngs))
  items = bm.read_benchmark("mmmu", str(tmp_path / "mmmu.parquet"))
  a, b, c = items
  assert a.prompt == ("Compare <image 2> with <image 1>. Which color dominates?\n"
                      "A. red\nB. blue\nC. green" + MC_SUFFIX)
  assert b.prompt == "What is shown in <image 1>?\nA. a <image 3>\nB. a tree" + MC_SUFFIX
  assert c.prompt == "How many sides has the shape in <image 1>?" + "\n" + SUFFIX
  # Referenced images, unique and sorted by column name (tags in options count too).
  assert a.meta["image_columns"] == ["image_1", "image_2"]
  np.testing.assert_array_equal(_pixels(a.images[0]), pngs[0][1])
  np.testing.assert_array_equal(_pixels(a.images[1]), pngs[1][1])
  assert b.meta["image_columns"] == ["image_1", "image_3"]
  np.testing.assert_array_equal(_pixels(b.images[1]), pngs[2][1])
  assert a.meta["options"] == ["red", "blue", "green"]
  assert a.meta["index2ans"] == {"A": "red", "B": "blue", "C": "green"}
  assert [it.meta["subject"] for it in items] == ["Art", "Art", "Math"]
  assert a.gold == "B" and c.gold == "42"

  preds = {"validation_Art_1": "(B)", "validation_Art_2": "The answer is B.",
           "validation_Math_1": "The answer is 42."}
  s = bm.score_benchmark("mmmu", items, preds)
  assert s["subjects"] == {"Art": {"accuracy": pytest.approx(50.0), "n": 2},
                           "Math": {"accuracy": pytest.approx(100.0), "n": 1}}
  assert s["domains"] == {"Art and Design": {"accuracy": pytest.approx(50.0), "n": 2},
                          "Science": {"accuracy": pytest.approx(100.0), "n": 1}}
  assert s["accuracy"] == pytest.approx(200 / 3)
  assert s["n"] == 3


def test_mmmu_random_fallback_is_reproducible(tmp_path):
  pngs = [_png(20 + i) for i in range(5)]
  _write_parquet(tmp_path / "mmmu.parquet", _mmmu_rows(pngs))
  items = bm.read_benchmark("mmmu", str(tmp_path / "mmmu.parquet"))[:2]
  preds = {it.id: "hmm" for it in items}  # no rule matches -> seeded random letters
  runs = {seed: bm.score_benchmark("mmmu", items, preds, seed=seed)["accuracy"] for seed in range(8)}
  assert runs == {seed: bm.score_benchmark("mmmu", items, preds, seed=seed)["accuracy"] for seed in range(8)}
  assert len(set(runs.values())) > 1


def test_mmmu_errors(tmp_path):
  pngs = [_png(20 + i) for i in range(5)]
  rows = _mmmu_rows(pngs)
  rows["options"] = ["__import__('os').getcwd()", "[]", "[]"]  # literal_eval refuses, never evaluated
  _write_parquet(tmp_path / "bad_options.parquet", rows)
  with pytest.raises(ValueError, match=r"bad_options.parquet: MMMU record validation_Art_1: 'options'"):
    bm.read_benchmark("mmmu", str(tmp_path / "bad_options.parquet"))
  rows = _mmmu_rows(pngs)
  del rows["image_2"]
  _write_parquet(tmp_path / "no_image_2.parquet", rows)
  with pytest.raises(ValueError, match=r"no_image_2.parquet: MMMU record validation_Art_1: .*'image_2'"):
    bm.read_benchmark("mmmu", str(tmp_path / "no_image_2.parquet"))


# ------------------------------------------------------------------------------------------
# RealWorldQA
# ------------------------------------------------------------------------------------------

RWQA_Q = ("Which way should the car go?\nA. Left\nB. Right\nC. Straight\n"
          "Please answer directly with only the letter of the correct option and nothing else.")


@pytest.mark.parametrize("layout", ["parquet", "jsonl"])
def test_realworldqa(tmp_path, layout):
  data, pixels = _png(30)
  questions = [RWQA_Q + "\n", "How many cars are there? Please answer directly with a single word or number.",
               RWQA_Q]
  answers = ["B", "2", "A"]
  if layout == "parquet":
    f = tmp_path / "rwqa.parquet"
    _write_parquet(f, {"question": questions, "answer": answers, "image": [_hf_image(data)] * 3})
  else:
    (tmp_path / "img.png").write_bytes(data)
    f = tmp_path / "rwqa.jsonl"
    _write_jsonl(f, [{"question": q, "answer": a, "image": "img.png"} for q, a in zip(questions, answers)])
  items = bm.read_benchmark("realworldqa", str(f))
  assert [it.id for it in items] == ["0", "1", "2"]  # no id column: row numbers
  assert items[0].prompt == RWQA_Q  # stripped, no suffix
  assert items[0].meta["options"] == {"A": "Left", "B": "Right", "C": "Straight"}
  np.testing.assert_array_equal(_pixels(items[2].images[0]), pixels)
  s = bm.score_benchmark("realworldqa", items, {"0": "B.", "1": "2.", "2": "C"})
  assert s == {"accuracy": pytest.approx(200 / 3), "n": 3}


# ------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------

def test_missing_column_names_file_and_column(tmp_path):
  _write_parquet(tmp_path / "pope.parquet", {"question": ["q"], "image": [_png(0)[0]]})
  with pytest.raises(ValueError, match=r"pope.parquet: no column 'answer', which pope needs"):
    bm.read_benchmark("pope", str(tmp_path / "pope.parquet"))
  _write_jsonl(tmp_path / "rw.jsonl", [{"question": "q", "answer": "a", "image": "i.png"}, {"question": "q"}])
  with pytest.raises(ValueError, match=r"rw.jsonl:2: record has no key 'answer'"):
    bm.read_benchmark("realworldqa", str(tmp_path / "rw.jsonl"))


def test_scoring_errors(tmp_path):
  _write_jsonl(tmp_path / "t.jsonl", [{"question_id": 5, "question": "q", "image": "i.png"}])
  items = bm.read_benchmark("vqav2", str(tmp_path / "t.jsonl"))
  with pytest.raises(KeyError, match=r"no prediction for 1 of 1 items, e.g. ids \['5'\]"):
    bm.score_benchmark("vqav2", items, {})
  with pytest.raises(ValueError, match="without human answers"):
    bm.score_benchmark("vqav2", items, {"5": "yes"})
  with pytest.raises(ValueError, match="unknown benchmark 'gqa'"):
    bm.read_benchmark("gqa", str(tmp_path / "t.jsonl"))


def test_max_new_tokens_cover_every_benchmark():
  assert set(bm.MAX_NEW_TOKENS) == set(bm.BENCHMARKS)
  assert bm.MAX_NEW_TOKENS["pope"] == 128 and bm.MAX_NEW_TOKENS["mmmu"] == 16
