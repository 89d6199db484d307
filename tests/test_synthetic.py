"""The synthetic VQA set: answers read back from the pixels, determinism, disjoint splits, LLaVA JSON."""

import collections
import importlib.util
import json
import os

import numpy as np
import pytest
from skimage.measure import label

from tinyvlm_jax.data import synthetic
from tinyvlm_jax.data.chat import encode_chat, from_sharegpt
from tinyvlm_jax.data.images import DEFAULT_MAX_PIXELS, load_image
from tinyvlm_jax.data.tokenizer import load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _foreground(image):
  return np.any(image != synthetic.BACKGROUND, axis=-1)  # [H, W] bool


def _colour_name(rgb):
  names = [name for name, value in synthetic.COLORS.items() if tuple(value) == tuple(rgb)]
  assert len(names) == 1, rgb
  return names[0]


@pytest.mark.parametrize("size", [32, 64])
def test_answers_are_correct_by_construction(size):
  examples = synthetic.generate_split("train", 150, seed=7, image_size=size)
  assert collections.Counter(ex["type"] for ex in examples) == {t: 30 for t in synthetic.TYPES}
  words, offsets = collections.defaultdict(set), collections.defaultdict(set)
  for ex in examples:
    image, kind, answer = ex["image"], ex["type"], ex["answer"]
    assert image.shape == (size, size, 3) and image.dtype == np.uint8
    assert ex["question"] == synthetic.QUESTIONS[kind] and (ex["question"], answer) in ex["qa"]
    asked = {q for q, _ in ex["qa"]}
    assert len(asked) == len(ex["qa"]) == (3 if kind in ("shape", "color", "position") else 1)
    fg = _foreground(image)
    colours = {tuple(c) for c in image[fg]}
    if kind in ("shape", "color", "position"):
      assert label(fg, connectivity=2).max() == 1
      (colour,) = colours  # one shape, one exact palette colour (no anti-aliasing)
      ys, xs = np.nonzero(fg)
      fill = fg.sum() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
      shape = "square" if fill > 0.95 else "circle" if fill > 0.68 else "triangle"
      assert fill > 0.95 or 0.68 < fill < 0.9 or 0.35 < fill < 0.62, fill
      dx, dy = xs.mean() / size - 0.5, ys.mean() / size - 0.5
      position = ("left" if dx < 0 else "right") if abs(dx) > abs(dy) else ("top" if dy < 0 else "bottom")
      assert max(abs(dx), abs(dy)) > 0.15 and max(abs(dx), abs(dy)) > 2 * min(abs(dx), abs(dy))  # clearly one side
      truth = {"shape": shape, "color": _colour_name(colour), "position": position}
      assert answer == truth[kind], (ex["id"], truth)
      assert sorted(ex["qa"]) == sorted((synthetic.QUESTIONS[k], v) for k, v in truth.items())
      assert ex["caption"] == f"A {truth['color']} {shape} on the {position}."
    elif kind == "count":
      n = label(fg, connectivity=2).max()
      assert answer == str(n) and 1 <= n <= 3
      assert ex["caption"].startswith(synthetic.NUMBER_WORDS[n].capitalize() + " shape")
      assert ex["caption"].count(" a ") + ex["caption"].count(": a ") >= n
    else:
      assert answer in synthetic.WORDS and len(colours) == 1
      ys, xs = np.nonzero(fg)
      words[answer].add(fg[ys.min():ys.max() + 1, xs.min():xs.max() + 1].tobytes())
      offsets[answer].add((xs.min() % (size // 8), ys.min() % (size // 8)))  # the word sits on the size/8 grid
      assert f'"{answer}"' in ex["caption"] and _colour_name(colours.pop()) in ex["caption"]
  # the same word always shows the same glyphs, different words different ones
  assert len(words) >= 5 and all(len(v) == 1 for v in words.values())
  assert all(len(v) == 1 for v in offsets.values()), offsets  # one ink offset from the grid per word
  assert len(set().union(*words.values())) == len(words)


def test_deterministic_and_splits_disjoint():
  a = synthetic.generate_split("train", 40, seed=1, image_size=32)
  b = synthetic.generate_split("train", 40, seed=1, image_size=32)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["image"], y["image"])
    assert {k: v for k, v in x.items() if k != "image"} == {k: v for k, v in y.items() if k != "image"}
  other = synthetic.generate_split("train", 40, seed=2, image_size=32)
  assert sum(np.array_equal(x["image"], y["image"]) for x, y in zip(a, other)) < 5
  # tiny images repeat within a split, yet never across splits
  train = synthetic.generate_split("train", 300, seed=0, image_size=16)
  test = synthetic.generate_split("test", 300, seed=0, image_size=16)
  assert "word" not in {ex["type"] for ex in train}  # too small to write legibly
  assert not {ex["image"].tobytes() for ex in train} & {ex["image"].tobytes() for ex in test}
  assert {synthetic.split_of(ex["image"]) for ex in test} == {"test"}
  assert len({ex["id"] for ex in train + test}) == 600
  with pytest.raises(ValueError, match="not available at image_size=16"):
    synthetic.make_example(np.random.default_rng(0), 16, kind="word")
  with pytest.raises(ValueError, match="unknown split"):
    synthetic.generate_split("val", 1, 0)


def test_llava_json_round_trip_through_the_cli(tmp_path):
  spec = importlib.util.spec_from_file_location("make_synthetic_data", os.path.join(ROOT, "launch", "make_synthetic_data.py"))
  cli = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(cli)
  out = str(tmp_path / "synth")
  path = cli.main(["--out", out, "--split", "test", "--n", "10", "--seed", "3", "--image-size", "32"])
  assert path == os.path.join(out, "test.json")
  rows = json.load(open(path))
  expected = synthetic.generate_split("test", 10, seed=3, image_size=32)
  tok = load_tokenizer()
  for row, ex in zip(rows, expected):
    assert row["id"] == ex["id"] and row["type"] == ex["type"] and row["caption"] == ex["caption"]
    assert row["image"] == f"images/{ex['id']}.png"
    np.testing.assert_array_equal(np.asarray(load_image(os.path.join(out, row["image"]), max_pixels=DEFAULT_MAX_PIXELS)),
                                  ex["image"])
    assert row["conversations"] == [{"from": "human", "value": "<image>\n" + ex["question"]},
                                    {"from": "gpt", "value": ex["answer"]}]
    enc = encode_chat(from_sharegpt(row["conversations"]), tok, max_len=128, num_image_tokens=4,
                      image_token_id=tok.image_pad_id)
    assert tok.decode(enc.ids[enc.loss_mask]) == ex["answer"] + "<|im_end|>"

  # --all-questions: every question the image answers, as turns of one conversation
  path = cli.main(["--out", str(tmp_path / "turns"), "--split", "test", "--n", "10", "--seed", "3", "--image-size", "32",
                   "--all-questions"])
  for row, ex in zip(json.load(open(path)), expected):
    want = []
    for i, (question, answer) in enumerate(ex["qa"]):
      want += [{"from": "human", "value": ("<image>\n" if i == 0 else "") + question}, {"from": "gpt", "value": answer}]
    assert row["conversations"] == want
    enc = encode_chat(from_sharegpt(row["conversations"]), tok, max_len=128, num_image_tokens=4,
                      image_token_id=tok.image_pad_id)
    assert tok.decode(enc.ids[enc.loss_mask]) == "".join(a + "<|im_end|>" for _, a in ex["qa"])
