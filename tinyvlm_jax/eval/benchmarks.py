"""Benchmark files -> `EvalItem`s (prompts as lmms-eval v0.2.4 builds them) and scoring.

Readers take a parquet file, a JSONL file, or a folder of parquet shards (else of JSONL
files), read in sorted name order. Parquet is read batch by batch with only the needed
columns, so `limit` stops early. An image cell is a struct `{bytes, path}` (HF `Image`
feature), raw bytes, or a path string; paths are resolved against the folder of the file
that holds them. Prompts, per EVAL.md and lmms-eval's `doc_to_text`:

  vqav2        `{question}\\nAnswer the question using a single word or phrase.`
  textvqa      the same with `question.capitalize()` (Python's: the rest is lowercased)
  pope         the same with `question.strip()`
  mmmu         `{question}\\nA. opt\\nB. opt\\n\\nAnswer with the option's letter from the given
               choices directly.` (multiple choice) or
               `{question}\\n\\nAnswer the question using a single word or phrase.` (open)
  realworldqa  `question.strip()` (it holds the options and the instruction)

`score_benchmark` reports percentages (x100) and `n`.
"""

from __future__ import annotations

import ast
import collections
import dataclasses
import json
import os
import random
import re
from typing import Any, Iterator, Mapping, Sequence

import pyarrow.parquet as pq

from tinyvlm_jax.eval import metrics

BENCHMARKS = ("vqav2", "textvqa", "pope", "mmmu", "realworldqa")

# lmms-eval v0.2.4 generation lengths (greedy everywhere). Its TextVQA task sets none, so
# the model's default applies (1024 for lmms-eval's llava); the answers are a word or a
# phrase, and a longer generation cannot exact-match them, so 16 as for VQAv2.
MAX_NEW_TOKENS = {"vqav2": 16, "textvqa": 16, "pope": 128, "mmmu": 16, "realworldqa": 16}

SHORT_ANSWER_PROMPT = "Answer the question using a single word or phrase."
MMMU_MULTI_CHOICE_PROMPT = "Answer with the option's letter from the given choices directly."

# MMMU subjects per domain (MMMU's DOMAIN_CAT2SUB_CAT).
MMMU_DOMAINS = {
    "Art and Design": ("Art", "Art_Theory", "Design", "Music"),
    "Business": ("Accounting", "Economics", "Finance", "Manage", "Marketing"),
    "Science": ("Biology", "Chemistry", "Geography", "Math", "Physics"),
    "Health and Medicine": ("Basic_Medical_Science", "Clinical_Medicine",
                            "Diagnostics_and_Laboratory_Medicine", "Pharmacy", "Public_Health"),
    "Humanities and Social Science": ("History", "Literature", "Sociology", "Psychology"),
    "Tech and Engineering": ("Agriculture", "Architecture_and_Engineering", "Computer_Science",
                             "Electronics", "Energy_and_Power", "Materials", "Mechanical_Engineering"),
}
MMMU_MAX_IMAGES = 7


@dataclasses.dataclass
class EvalItem:
  """One benchmark question.

  images: encoded image bytes or file paths, in the order lmms-eval passes them. For MMMU
    these are the `image_k` columns that the `<image k>` tags of the question and options
    name, unique and sorted (lmms-eval's `mmmu_doc_to_visual`); the tags stay in `prompt`,
    as lmms-eval's default (`interleaved_format: false`) leaves them. TinyVLM takes one
    image: callers use `images[0]`.
  prompt: the user text that follows the image.
  gold: VQAv2/TextVQA: list of the human answers (None without answers, e.g. a test
    split); POPE: "yes"/"no"; MMMU: the `answer` string as stored (a letter, or the open
    answer); RealWorldQA: the `answer` string.
  meta: per benchmark: category (POPE); subject, question_type, options, all_choices,
    index2ans, image_columns, subfield (MMMU); options (RealWorldQA, parsed from the
    question); answer_type (VQAv2); source_id when row numbers replaced duplicate ids.
  """
  id: str
  images: list[bytes | str]
  prompt: str
  gold: Any
  meta: dict = dataclasses.field(default_factory=dict)


# ------------------------------------------------------------------------------------------
# Reading rows
# ------------------------------------------------------------------------------------------

def _data_files(path: str) -> list[str]:
  if os.path.isdir(path):
    names = sorted(os.listdir(path))
    for ext in (".parquet", ".jsonl"):
      found = [os.path.join(path, n) for n in names if n.endswith(ext)]
      if found:
        return found
    raise FileNotFoundError(f"{path}: no .parquet or .jsonl files in this folder")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: no such benchmark file or folder")
  return [path]


def _rows(file: str, required: Sequence[str], optional: Sequence[str], benchmark: str) -> Iterator[dict]:
  """Records of one file, holding the required columns and whichever optional ones exist."""
  if file.endswith(".parquet"):
    pf = pq.ParquetFile(file)
    names = set(pf.schema_arrow.names)
    missing = [c for c in required if c not in names]
    if missing:
      raise ValueError(f"{file}: no column {missing[0]!r}, which {benchmark} needs "
                       f"(needs {list(required)}; the file has {sorted(names)})")
    columns = list(required) + [c for c in optional if c in names]
    for batch in pf.iter_batches(batch_size=64, columns=columns):
      yield from batch.to_pylist()
  elif file.endswith(".jsonl"):
    with open(file, encoding="utf-8") as f:
      for lineno, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          rec = json.loads(line)
        except json.JSONDecodeError as e:
          raise ValueError(f"{file}:{lineno}: not a JSON object ({e})") from e
        missing = [c for c in required if c not in rec]
        if missing:
          raise ValueError(f"{file}:{lineno}: record has no key {missing[0]!r}, which {benchmark} "
                           f"needs (needs {list(required)}; the record has {sorted(rec)})")
        yield rec
  else:
    raise ValueError(f"{file}: unknown benchmark file type, expected .parquet or .jsonl")


def _image(value: Any, file: str, column: str, record: str) -> bytes | str:
  """An image cell -> encoded bytes or a path (relative paths are taken from the file's folder)."""
  if isinstance(value, Mapping):
    if value.get("bytes"):
      return bytes(value["bytes"])
    value = value.get("path")
  if isinstance(value, (bytes, bytearray)):
    return bytes(value)
  if isinstance(value, str) and value:
    return value if os.path.isabs(value) else os.path.join(os.path.dirname(os.path.abspath(file)), value)
  raise ValueError(f"{file}: record {record}: column {column!r} holds no image "
                   f"(expected {{bytes, path}}, bytes or a path; got {type(value).__name__})")


def _answer_strings(value: Any, file: str, record: str) -> list[str] | None:
  """VQA `answers`: list of strings or of {answer, ...} dicts -> list of strings."""
  if value is None:
    return None
  out = []
  for a in value:
    if isinstance(a, Mapping):
      if "answer" not in a:
        raise ValueError(f"{file}: record {record}: an entry of 'answers' has no 'answer' key: {a!r}")
      a = a["answer"]
    if not isinstance(a, str):
      raise ValueError(f"{file}: record {record}: answers must be strings or {{answer: ...}}, got {a!r}")
    out.append(a)
  return out


# ------------------------------------------------------------------------------------------
# Items per benchmark
# ------------------------------------------------------------------------------------------

_ID_COLUMNS = {"vqav2": ("question_id",), "textvqa": ("question_id",), "pope": ("id", "question_id"),
               "mmmu": ("id",), "realworldqa": ("id", "question_id")}
_MMMU_IMAGE_COLUMNS = tuple(f"image_{k}" for k in range(1, MMMU_MAX_IMAGES + 1))
_COLUMNS = {  # benchmark -> (required, optional)
    "vqav2": (("question", "image"), ("question_id", "answers", "answer_type", "multiple_choice_answer")),
    "textvqa": (("question", "image"), ("question_id", "answers", "ocr_tokens")),
    "pope": (("question", "image", "answer"), ("id", "question_id", "category")),
    "mmmu": (("id", "question", "options", "answer", "question_type"), _MMMU_IMAGE_COLUMNS + ("subfield", "subject")),
    "realworldqa": (("question", "answer", "image"), ("id", "question_id")),
}


def _record_id(name: str, row: dict, index: int) -> str:
  for col in _ID_COLUMNS[name]:
    if row.get(col) is not None:
      return str(row[col])
  return str(index)


def mmmu_subject(item_id: str) -> str:
  """"validation_Art_Theory_12" -> "Art_Theory" (lmms-eval `extract_subset_name`)."""
  split = item_id.split("_")[0]
  m = re.search(rf"^{re.escape(split)}_(.+?)_\d+$", item_id)
  if not m:
    raise ValueError(f"MMMU id {item_id!r} is not '<split>_<Subject>_<number>'")
  return m.group(1)


def mmmu_prompt(question: str, question_type: str, options: Sequence[str]) -> str:
  """lmms-eval `construct_prompt`."""
  if question_type == "multiple-choice":
    letters, _ = metrics.mmmu_choices(options)
    lines = "\n".join(f"{l}. {o}" for l, o in zip(letters, options))
    return f"{question}\n{lines}\n\n{MMMU_MULTI_CHOICE_PROMPT}"
  return f"{question}\n\n{SHORT_ANSWER_PROMPT}"


def _mmmu_item(row: dict, file: str, item_id: str) -> EvalItem:
  options = row["options"]
  if isinstance(options, str):
    try:
      options = ast.literal_eval(options)
    except (ValueError, SyntaxError) as e:
      raise ValueError(f"{file}: MMMU record {item_id}: 'options' is not a Python list literal: "
                       f"{row['options']!r}") from e
  if not isinstance(options, (list, tuple)) or not all(isinstance(o, str) for o in options):
    raise ValueError(f"{file}: MMMU record {item_id}: 'options' must be a list of strings, got {options!r}")
  options = list(options)
  qtype = row["question_type"]
  prompt = mmmu_prompt(row["question"], qtype, options)
  # Sorted as strings, like lmms-eval; the same as numeric order for image_1..image_7.
  columns = sorted({t.strip("<>").replace(" ", "_") for t in re.findall(r"<image \d+>", prompt)})
  images = []
  for col in columns:
    if row.get(col) is None:
      raise ValueError(f"{file}: MMMU record {item_id}: the text refers to <{col.replace('_', ' ')}> "
                       f"but column {col!r} is missing or empty")
    images.append(_image(row[col], file, col, item_id))
  try:
    subject = mmmu_subject(item_id)
  except ValueError:
    if not row.get("subject"):
      raise ValueError(f"{file}: MMMU record id {item_id!r} is not '<split>_<Subject>_<number>' "
                       "and there is no 'subject' column") from None
    subject = row["subject"]
  all_choices, index2ans = metrics.mmmu_choices(options)
  meta = dict(subject=subject, question_type=qtype, options=options, all_choices=all_choices,
              index2ans=index2ans, image_columns=columns, subfield=row.get("subfield"))
  return EvalItem(item_id, images, prompt, row["answer"], meta)


def _item(name: str, row: dict, file: str, item_id: str) -> EvalItem:
  if name == "mmmu":
    return _mmmu_item(row, file, item_id)
  images = [_image(row["image"], file, "image", item_id)]
  question = row["question"]
  if name in ("vqav2", "textvqa"):
    if name == "textvqa":
      question = question.capitalize()
    meta = {k: row[k] for k in ("answer_type", "multiple_choice_answer", "ocr_tokens") if k in row}
    return EvalItem(item_id, images, f"{question}\n{SHORT_ANSWER_PROMPT}",
                    _answer_strings(row.get("answers"), file, item_id), meta)
  if name == "pope":
    return EvalItem(item_id, images, f"{question.strip()}\n{SHORT_ANSWER_PROMPT}", row["answer"],
                    {"category": row.get("category") or "all"})
  return EvalItem(item_id, images, question.strip(), row["answer"],  # realworldqa
                  {"options": metrics.options_in_question(question)})


def read_benchmark(name: str, path: str, limit: int | None = None) -> list[EvalItem]:
  """Items of benchmark `name` from a parquet/JSONL file or a folder of shards (EVAL.md layouts).

  Ids come from the benchmark's id column (question_id; id for POPE, MMMU); without one,
  or when the ids read repeat, the row number is used (the original id goes to
  meta["source_id"]).
  """
  if name not in _COLUMNS:
    raise ValueError(f"unknown benchmark {name!r}; expected one of {BENCHMARKS}")
  required, optional = _COLUMNS[name]
  items: list[EvalItem] = []
  index = 0
  for file in _data_files(path):
    if limit is not None and len(items) >= limit:
      break
    for row in _rows(file, required, optional, name):
      if limit is not None and len(items) >= limit:
        break
      items.append(_item(name, row, file, _record_id(name, row, index)))
      index += 1
  ids = [it.id for it in items]
  if len(set(ids)) != len(ids):
    for i, it in enumerate(items):
      it.meta["source_id"], it.id = it.id, str(i)
  return items


# ------------------------------------------------------------------------------------------
# Scoring
# ------------------------------------------------------------------------------------------

def _pct(x: float) -> float:
  return 100.0 * x


def _score_mmmu(items: Sequence[EvalItem], preds: Mapping[str, str], rng: random.Random) -> dict:
  correct_by_subject: dict[str, list[bool]] = collections.defaultdict(list)
  for it in items:
    if it.meta["question_type"] == "multiple-choice":
      parsed = metrics.parse_mmmu_multi_choice(preds[it.id], it.meta["all_choices"], it.meta["index2ans"], rng)
      ok = metrics.eval_mmmu_multi_choice(it.gold, parsed)
    else:
      ok = metrics.eval_mmmu_open(it.gold, metrics.parse_mmmu_open(preds[it.id]))
    correct_by_subject[it.meta["subject"]].append(ok)
  subjects = {s: {"accuracy": _pct(sum(v) / len(v)), "n": len(v)} for s, v in correct_by_subject.items()}
  domains = {}
  for domain, subs in MMMU_DOMAINS.items():
    flags = [ok for s in subs for ok in correct_by_subject.get(s, [])]
    if flags:
      domains[domain] = {"accuracy": _pct(sum(flags) / len(flags)), "n": len(flags)}
  total = sum(sum(v) for v in correct_by_subject.values())
  # Instance-weighted over subjects (MMMU's calculate_ins_level_acc) = pooled accuracy.
  return {"accuracy": _pct(total / len(items)), "subjects": subjects, "domains": domains}


def score_benchmark(name: str, items: Sequence[EvalItem], predictions: Mapping[str, str],
                    *, seed: int = metrics.MMMU_SEED) -> dict:
  """Metrics of `predictions` (item id -> generated text) on `items`, in percent, plus `n`.

  vqav2/textvqa: {"accuracy"} (VQAv2 also "answer_types": accuracy per answer_type);
  pope: {category: {accuracy, precision, recall, f1, yes_ratio, n}, "overall": ...,
  "mean": unweighted mean over categories}; mmmu: {"accuracy" (instance-weighted),
  "subjects": {subject: {accuracy, n}}, "domains": {...}}; realworldqa: {"accuracy"}.
  The random fallback of the letter parser draws from one `random.Random(seed)`, in item
  order, so a score is reproducible.
  """
  if name not in _COLUMNS:
    raise ValueError(f"unknown benchmark {name!r}; expected one of {BENCHMARKS}")
  if not items:
    raise ValueError(f"score_benchmark({name!r}): no items")
  missing = [it.id for it in items if it.id not in predictions]
  if missing:
    raise KeyError(f"{name}: no prediction for {len(missing)} of {len(items)} items, e.g. ids {missing[:5]}")
  n = len(items)
  if name in ("vqav2", "textvqa"):
    no_gold = [it.id for it in items if not it.gold]
    if no_gold:
      raise ValueError(f"{name}: items without human answers (a test split?), e.g. ids {no_gold[:5]}")
    accs = [metrics.vqa_accuracy(predictions[it.id], it.gold, textvqa=name == "textvqa") for it in items]
    out: dict[str, Any] = {"accuracy": _pct(sum(accs) / n)}
    if name == "vqav2" and all(it.meta.get("answer_type") for it in items):
      by_type = collections.defaultdict(list)
      for it, a in zip(items, accs):
        by_type[it.meta["answer_type"]].append(a)
      out["answer_types"] = {t: {"accuracy": _pct(sum(v) / len(v)), "n": len(v)} for t, v in by_type.items()}
  elif name == "pope":
    raw = metrics.pope_scores([predictions[it.id] for it in items], [it.gold for it in items],
                              [it.meta["category"] for it in items])
    out = {group: {k: (v if k == "n" else _pct(v)) for k, v in scores.items()} for group, scores in raw.items()}
  elif name == "mmmu":
    out = _score_mmmu(items, predictions, random.Random(seed))
  else:
    rng = random.Random(seed)
    correct = [metrics.realworldqa_correct(predictions[it.id], it.gold, it.prompt, rng) for it in items]
    out = {"accuracy": _pct(sum(correct) / n)}
  out["n"] = n
  return out

