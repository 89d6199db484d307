"""A procedural VQA set for the CPU demo and tests: coloured shapes, counts, positions, words.

Every answer is one word and correct by construction. Shape, colour and position questions
use images with a single shape; counting images hold 1-3 shapes in separate cells of a 3x3
grid; word images hold one short word in PIL's bitmap font (only when the image is at least
32 pixels wide, else the word type is left out), its top-left corner on a grid of size/8 pixels:
the patch grid of the demo's tower (8 px patches at 64 px), since a tower trained from scratch
learnt to read words at every sub-patch offset far more slowly (caption-tag pretraining, 400
steps: word 0.72 held-out aligned, 0.22 unaligned). Each example also has a caption for stage 1,
and the list of every question its image answers (a single-shape image answers shape, colour and
position), which `write_llava(..., all_questions=True)` writes as turns of one conversation.
Splits are deterministic in (seed, split); train and test draw from disjoint seed streams,
and each split keeps only images whose content hash falls in its part, so no test image
ever appears in train, even at tiny sizes where random draws repeat.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFont

SHAPES = ("circle", "square", "triangle")
COLORS = {"red": (230, 25, 25), "green": (30, 190, 40), "blue": (30, 60, 230), "yellow": (240, 220, 30),
          "purple": (150, 40, 200)}
POSITIONS = ("left", "right", "top", "bottom")
WORDS = ("cat", "dog", "sun", "car", "hat", "box", "pen", "cup")
NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}
BACKGROUND = (24, 24, 24)
QUESTIONS = {
    "shape": "What shape is in the image?",
    "color": "What color is the shape?",
    "position": "Where is the shape?",
    "count": "How many shapes are there?",
    "word": "What word is written?",
}
TYPES = tuple(QUESTIONS)
SPLIT_STREAMS = {"train": 0, "test": 1}  # disjoint SeedSequence keys per split
TEST_PARTS = 4  # an image belongs to test when its content hash is 0 mod TEST_PARTS, else to train
MIN_WORD_IMAGE_SIZE = 32
WORD_GRID_CELLS = 8  # a word starts on a grid of size / 8 pixels (see above)


def types_for(image_size: int) -> tuple[str, ...]:
  """Question types that can be drawn legibly at this image size."""
  return TYPES if image_size >= MIN_WORD_IMAGE_SIZE else tuple(t for t in TYPES if t != "word")


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: int, cy: int, r: int, rgb) -> None:
  """Filled, aliased shape centred on (cx, cy); the centre pixel is always inside it."""
  if shape == "circle":
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=rgb)
  elif shape == "square":
    s = max(1, round(0.85 * r))  # about the circle's area
    draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=rgb)
  elif shape == "triangle":
    low = cy + round(0.8 * r)
    draw.polygon([(cx, cy - r), (cx - r, low), (cx + r, low)], fill=rgb)
  else:
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def _phrase(color: str, shape: str) -> str:
  return f"a {color} {shape}"


def _single_shape(rng: np.random.Generator, size: int) -> tuple[Image.Image, dict[str, str], str]:
  shape = SHAPES[rng.integers(len(SHAPES))]
  color = list(COLORS)[rng.integers(len(COLORS))]
  position = POSITIONS[rng.integers(len(POSITIONS))]
  r = int(rng.integers(max(2, round(0.12 * size)), max(3, round(0.18 * size)) + 1))
  jitter = max(1, round(0.06 * size))
  along = size // 2 + int(rng.integers(-jitter, jitter + 1))  # along the edge
  across = {"left": size // 4, "top": size // 4, "right": size - size // 4, "bottom": size - size // 4}[position]
  across += int(rng.integers(-jitter // 2, jitter // 2 + 1))
  cx, cy = (across, along) if position in ("left", "right") else (along, across)
  image = Image.new("RGB", (size, size), BACKGROUND)
  _draw_shape(ImageDraw.Draw(image), shape, cx, cy, r, COLORS[color])
  answers = {"shape": shape, "color": color, "position": position}
  return image, answers, f"{_phrase(color, shape).capitalize()} on the {position}."


def _count(rng: np.random.Generator, size: int) -> tuple[Image.Image, dict[str, str], str]:
  n = int(rng.integers(1, 4))
  cell = size / 3
  r = max(1, round(0.3 * cell))
  slack = max(0, int(cell / 2 - r - 1))  # keeps a gap of at least one pixel between cells
  cells = rng.choice(9, size=n, replace=False)
  image = Image.new("RGB", (size, size), BACKGROUND)
  draw = ImageDraw.Draw(image)
  phrases = []
  for c in sorted(cells):
    shape = SHAPES[rng.integers(len(SHAPES))]
    color = list(COLORS)[rng.integers(len(COLORS))]
    cx = int((c % 3 + 0.5) * cell) + int(rng.integers(-slack, slack + 1))
    cy = int((c // 3 + 0.5) * cell) + int(rng.integers(-slack, slack + 1))
    _draw_shape(draw, shape, cx, cy, r, COLORS[color])
    phrases.append(_phrase(color, shape))
  listed = phrases[0] if n == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
  caption = f"{NUMBER_WORDS[n].capitalize()} shape{'s' if n > 1 else ''}: {listed}."
  return image, {"count": str(n)}, caption


def _word(rng: np.random.Generator, size: int) -> tuple[Image.Image, dict[str, str], str]:
  word = WORDS[rng.integers(len(WORDS))]
  color = list(COLORS)[rng.integers(len(COLORS))]
  font = ImageFont.load_default_imagefont()  # PIL's built-in bitmap font: the same pixels everywhere
  left, top, right, bottom = font.getbbox(word)
  glyphs = Image.new("L", (right - left, bottom - top), 0)
  ImageDraw.Draw(glyphs).text((-left, -top), word, fill=255, font=font)
  scale = max(1, size // 32)
  glyphs = glyphs.resize((glyphs.width * scale, glyphs.height * scale), Image.Resampling.NEAREST)
  grid = max(1, size // WORD_GRID_CELLS)
  x = int(rng.integers(0, (size - glyphs.width) // grid + 1)) * grid
  y = int(rng.integers(0, (size - glyphs.height) // grid + 1)) * grid
  image = Image.new("RGB", (size, size), BACKGROUND)
  image.paste(Image.new("RGB", glyphs.size, COLORS[color]), (x, y), mask=glyphs.point(lambda v: 255 if v > 127 else 0))
  return image, {"word": word}, f'The word "{word}" written in {color}.'


def make_example(rng: np.random.Generator, image_size: int = 64, *, kind: str | None = None,
                 example_id: str = "synthetic") -> dict:
  """One example: dict(id, image uint8 [H, W, 3], question, answer, type, caption, qa).

  `kind` is a question type from `TYPES` (None: drawn from `rng` among `types_for(image_size)`).
  `qa` is every (question, answer) pair the image answers, in a random order.
  """
  allowed = types_for(image_size)
  if kind is None:
    kind = allowed[rng.integers(len(allowed))]
  if kind not in allowed:
    raise ValueError(f"question type {kind!r} is not available at image_size={image_size}; expected one of {allowed}")
  if kind in ("shape", "color", "position"):
    image, answers, caption = _single_shape(rng, image_size)
  elif kind == "count":
    image, answers, caption = _count(rng, image_size)
  else:
    image, answers, caption = _word(rng, image_size)
  qa = [(QUESTIONS[k], answers[k]) for k in rng.permutation(sorted(answers))]
  return {"id": example_id, "image": np.asarray(image, np.uint8), "question": QUESTIONS[kind],
          "answer": answers[kind], "type": kind, "caption": caption, "qa": qa}


def split_of(image: np.ndarray) -> str:
  """The split an image belongs to, from a hash of its pixels."""
  return "test" if hashlib.blake2b(image.tobytes(), digest_size=8).digest()[0] % TEST_PARTS == 0 else "train"


def generate_split(split: str, n: int, seed: int, image_size: int = 64) -> list[dict]:
  """`n` examples of `split` ("train" | "test"), question types in turn; the same for the same arguments.

  Example i is the first draw of the stream (seed, split, i, attempt) whose image belongs to
  `split` (see `split_of`).
  """
  if split not in SPLIT_STREAMS:
    raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLIT_STREAMS)}")
  kinds = types_for(image_size)
  out = []
  for i in range(n):
    for attempt in range(1000):
      rng = np.random.default_rng([seed, SPLIT_STREAMS[split], i, attempt])
      ex = make_example(rng, image_size, kind=kinds[i % len(kinds)], example_id=f"{split}-{i:06d}")
      if split_of(ex["image"]) == split:
        break
    else:
      raise RuntimeError(f"no {split} image of type {ex['type']} found in 1000 draws at image_size={image_size}")
    out.append(ex)
  return out


def write_llava(out_dir: str, split: str, n: int, seed: int, image_size: int = 64, *,
                all_questions: bool = False) -> str:
  """Writes PNGs under out_dir/images and the LLaVA JSON list out_dir/{split}.json; returns the JSON path.

  Each record asks its example's question; with `all_questions`, every question its image
  answers, as turns of one conversation (more supervision per image, for training).
  """
  os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
  rows = []
  for ex in generate_split(split, n, seed, image_size):
    rel = os.path.join("images", f"{ex['id']}.png")
    Image.fromarray(ex["image"]).save(os.path.join(out_dir, rel))
    conversation = []
    for question, answer in (ex["qa"] if all_questions else [(ex["question"], ex["answer"])]):
      prefix = "" if conversation else "<image>\n"
      conversation += [{"from": "human", "value": prefix + question}, {"from": "gpt", "value": answer}]
    rows.append({"id": ex["id"], "image": rel, "conversations": conversation, "type": ex["type"],
                 "caption": ex["caption"]})
  path = os.path.join(out_dir, f"{split}.json")
  with open(path, "w") as f:
    json.dump(rows, f, indent=1)
  return path
