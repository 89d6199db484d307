"""Answer parsing and metrics of the five benchmarks, as lmms-eval v0.2.4 computes them.

Sources reimplemented here (same behaviour, quirks included, each noted where it bites):
- VQA accuracy: lmms-eval `tasks/_task_utils/vqa_eval_metric.py` (EvalAI's answer
  processor, from MMF) and `tasks/vqav2/utils.py`, `tasks/textvqa/utils.py`.
- POPE: LLaVA's `llava/eval/eval_pope.py` (yes/no parsing, confusion counts).
- MMMU: the official `MMMU/eval/eval_utils.py` as vendored in lmms-eval `tasks/mmmu/utils.py`
  (lmms-eval adds the `A.` pass to the multiple-choice parser).
- RealWorldQA: EVAL.md (letter extraction as for MMMU, else lmms-eval's exact match).

All functions return fractions in [0, 1]; `benchmarks.score_benchmark` scales to percent.
"""

from __future__ import annotations

import random
import re
from typing import Mapping, Sequence

# ------------------------------------------------------------------------------------------
# VQA answer normalisation (EvalAI)
# ------------------------------------------------------------------------------------------

# Each line: the contracted form, then every spelling that maps to it. Two lines keep the
# reference table's oddities: "somebody'd" maps to "somebodyd", and "let's"/"she's" map to
# themselves. Keys with capitals ("Im", "Ive", ...) can never match (the text is lowercased
# first); they are kept so the table is the reference one.
_CONTRACTION_LINES = """
ain't aint
aren't arent
can't cant
could've couldve
couldn't couldnt
couldn't've couldn'tve couldnt've
didn't didnt
doesn't doesnt
don't dont
hadn't hadnt
hadn't've hadnt've hadn'tve
hasn't hasnt
haven't havent
he'd hed
he'd've hed've he'dve
he's hes
how'd howd
how'll howll
how's hows
I'd've Id've I'dve
I'm Im
I've Ive
isn't isnt
it'd itd
it'd've itd've it'dve
it'll itll
let's let's
ma'am maam
mightn't mightnt
mightn't've mightnt've mightn'tve
might've mightve
mustn't mustnt
must've mustve
needn't neednt
not've notve
o'clock oclock
oughtn't oughtnt
'ow's'at ow's'at 'ows'at 'ow'sat
shan't shant
she'd've shed've she'dve
she's she's
should've shouldve
shouldn't shouldnt
shouldn't've shouldnt've shouldn'tve
somebodyd somebody'd
somebody'd've somebodyd've somebody'dve
somebody'll somebodyll
somebody's somebodys
someone'd someoned
someone'd've someoned've someone'dve
someone'll someonell
someone's someones
something'd somethingd
something'd've somethingd've something'dve
something'll somethingll
that's thats
there'd thered
there'd've thered've there'dve
there're therere
there's theres
they'd theyd
they'd've theyd've they'dve
they'll theyll
they're theyre
they've theyve
'twas twas
wasn't wasnt
we'd've wed've we'dve
we've weve
weren't werent
what'll whatll
what're whatre
what's whats
what've whatve
when's whens
where'd whered
where's wheres
where've whereve
who'd whod
who'd've whod've who'dve
who'll wholl
who's whos
who've whove
why'll whyll
why're whyre
why's whys
won't wont
would've wouldve
wouldn't wouldnt
wouldn't've wouldnt've wouldn'tve
y'all yall
y'all'll yall'll y'allll
y'all'd've yall'd've y'alld've y'all'dve
you'd youd
you'd've youd've you'dve
you'll youll
you're youre
you've youve
"""
CONTRACTIONS: dict[str, str] = {
    key: line.split()[0]
    for line in _CONTRACTION_LINES.strip().splitlines() for key in line.split()[1:]}

# "none" -> "0" is in the reference table too (beyond zero..ten).
NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten".split())} | {"none": "0"}
ARTICLES = frozenset({"a", "an", "the"})
_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
                "@", "`", ",", "?", "!")
# The reference pattern is r"(?!<=\d)(\.)(?!\d)": its first group is a (mistyped) lookahead
# that always holds before a ".", so a period is dropped unless a digit follows it.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(?<=\d)(\,)+(?=\d)")
# The reference passes re.UNICODE (= 32) where `sub` takes `count`: at most 32 periods go.
_PERIOD_STRIP_COUNT = int(re.UNICODE)


def _evalai_tokenize(text: str) -> str:
  """Lowercase, drop "," and "?", split off "'s" (EvalAI's `word_tokenize`)."""
  text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's")
  return text.strip()


def process_punctuation(text: str) -> str:
  """A punctuation mark next to a space (or any text with a digit,digit group) is deleted,
  otherwise it becomes a space; then periods not followed by a digit are dropped."""
  out = text
  delete_all = _COMMA_STRIP.search(text) is not None
  for p in _PUNCTUATION:
    if delete_all or p + " " in text or " " + p in text:
      out = out.replace(p, "")
    else:
      out = out.replace(p, " ")
  return _PERIOD_STRIP.sub("", out, count=_PERIOD_STRIP_COUNT)


def process_digit_article(text: str) -> str:
  """Lowercase, number words -> digits, drop articles, expand contractions; words rejoined by one space."""
  words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
  words = [w for w in words if w not in ARTICLES]
  return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_vqa_answer(text: str) -> str:
  """EvalAI's answer processor (lmms-eval `EvalAIAnswerProcessor.__call__`)."""
  text = _evalai_tokenize(text)
  text = text.replace("\n", " ").replace("\t", " ").strip()
  return process_digit_article(process_punctuation(text))


def vqa_accuracy(pred: str, answers: Sequence[str], *, textvqa: bool = False) -> float:
  """Leave-one-out VQA accuracy of one prediction against the human answers (usually 10).

  For each human answer i: min(1, #{j != i : answer_j == pred} / 3); the mean over i.
  The prediction always goes through the full EvalAI processor. The answers differ:
  - VQAv2 (`textvqa=False`, lmms-eval `vqav2_process_results`): newline/tab -> space and
    strip; only when the answers are not all identical are they (and the prediction, a
    second time) passed through punctuation and digit/article processing. They are never
    lowercased, and "," / "?" are not dropped first.
  - TextVQA (`textvqa=True`, `textvqa_process_results`): each answer goes through the full
    processor (lowercase, drop "," and "?", then the same steps).
  """
  if not answers:
    raise ValueError("vqa_accuracy needs at least one human answer, got none")
  res = normalize_vqa_answer(pred)
  if textvqa:
    gts = [normalize_vqa_answer(a) for a in answers]
  else:
    gts = [a.replace("\n", " ").replace("\t", " ").strip() for a in answers]
    if len(set(gts)) > 1:
      gts = [process_digit_article(process_punctuation(a)) for a in gts]
      res = process_digit_article(process_punctuation(res))
  matches = [g == res for g in gts]
  total = sum(matches)
  return sum(min(1.0, (total - m) / 3) for m in matches) / len(gts)


# ------------------------------------------------------------------------------------------
# POPE (LLaVA eval_pope.py)
# ------------------------------------------------------------------------------------------

def parse_pope(text: str) -> str:
  """Free text -> "yes" | "no": the text before the first ".", commas removed, split on
  single spaces; "No", "no" or "not" among the words means "no", anything else "yes".

  The text is stripped first, as LLaVA's answer files hold `outputs.strip()`.
  """
  text = text.strip().split(".")[0].replace(",", "")
  words = text.split(" ")
  return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def _binary_scores(preds: Sequence[str], golds: Sequence[str]) -> dict[str, float]:
  tp = sum(p == "yes" and g == "yes" for p, g in zip(preds, golds))
  tn = sum(p == "no" and g == "no" for p, g in zip(preds, golds))
  fp = sum(p == "yes" and g == "no" for p, g in zip(preds, golds))
  fn = sum(p == "no" and g == "yes" for p, g in zip(preds, golds))
  n = len(preds)
  precision = tp / (tp + fp) if tp + fp else 0.0
  recall = tp / (tp + fn) if tp + fn else 0.0
  f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
  return dict(accuracy=(tp + tn) / n if n else 0.0, precision=precision, recall=recall, f1=f1,
              yes_ratio=sum(p == "yes" for p in preds) / n if n else 0.0, n=n)


def pope_scores(preds: Sequence[str], golds: Sequence[str], categories: Sequence[str]) -> dict[str, dict]:
  """POPE metrics per category and over all items ("overall"), plus "mean" (unweighted mean
  of each metric over the categories, the way papers usually quote POPE F1).

  `preds` are free text (parsed with `parse_pope`; "yes"/"no" parse to themselves), `golds`
  are "yes"/"no" in any case. yes_ratio is the share of *predicted* yes (LLaVA; lmms-eval
  v0.2.4's `pope_aggregate_yes_ratio` counts the gold answers instead).
  Zero denominators give 0, as in lmms-eval.
  """
  if not len(preds) == len(golds) == len(categories):
    raise ValueError(f"pope_scores: {len(preds)} predictions, {len(golds)} golds, {len(categories)} categories")
  parsed = [parse_pope(p) for p in preds]
  gold = []
  for i, g in enumerate(golds):
    g = g.strip().lower()
    if g not in ("yes", "no"):
      raise ValueError(f"POPE gold answer #{i} is {g!r}, expected 'yes' or 'no'")
    gold.append(g)
  out = {}
  for cat in dict.fromkeys(categories):  # first-seen order
    idx = [i for i, c in enumerate(categories) if c == cat]
    out[cat] = _binary_scores([parsed[i] for i in idx], [gold[i] for i in idx])
  cats = list(out)
  out["overall"] = _binary_scores(parsed, gold)
  out["mean"] = {k: sum(out[c][k] for c in cats) / len(cats)
                 for k in ("accuracy", "precision", "recall", "f1", "yes_ratio")} if cats else {}
  return out


# ------------------------------------------------------------------------------------------
# MMMU (official eval_utils.py, lmms-eval flavour)
# ------------------------------------------------------------------------------------------

MMMU_SEED = 0  # default seed of the random fallback of the multiple-choice parser


def _as_rng(rng: random.Random | int) -> random.Random:
  return rng if isinstance(rng, random.Random) else random.Random(rng)


def mmmu_choices(options: Sequence[str]) -> tuple[list[str], dict[str, str]]:
  """Options -> (all_choices ["A", "B", ...], index2ans {"A": option, ...})."""
  letters = [chr(ord("A") + i) for i in range(len(options))]
  return letters, dict(zip(letters, options))


def parse_mmmu_multi_choice(response: str, all_choices: Sequence[str], index2ans: Mapping[str, str],
                            rng: random.Random | int = MMMU_SEED) -> str:
  """Free text -> one letter of `all_choices` (official MMMU rule, lmms-eval variant).

  Strip , . ! ? ; : ' from both ends (one character kind after the other, in that order),
  pad with spaces, then collect candidates: "(A)"; else "A " anywhere; else "A."; else, if
  the padded response has more than 5 words, every option whose text occurs in it
  (case-insensitive). Several candidates: the one whose last occurrence ("(A)", " A " or
  the option text) starts last; ties and not-found (-1) go to the earliest choice. None:
  a random choice from `rng` (a `random.Random`, consumed; or an int seed for a fresh one,
  so the same seed gives the same letter).
  """
  for ch in (",", ".", "!", "?", ";", ":", "'"):
    response = response.strip(ch)
  response = f" {response} "
  by_text = False
  with_brackets = False
  candidates = [c for c in all_choices if f"({c})" in response]
  if candidates:
    with_brackets = True
  else:
    candidates = [c for c in all_choices if f"{c} " in response]
  if not candidates:
    candidates = [c for c in all_choices if f"{c}." in response]
  if not candidates and len(response.split()) > 5:
    candidates = [c for c, ans in index2ans.items() if ans.lower() in response.lower()]
    by_text = bool(candidates)
  if not candidates:
    return _as_rng(rng).choice(list(all_choices))
  if len(candidates) == 1:
    return candidates[0]
  if by_text:
    starts = [response.lower().rfind(index2ans[c].lower()) for c in candidates]
  elif with_brackets:
    starts = [response.rfind(f"({c})") for c in candidates]
  else:
    starts = [response.rfind(f" {c} ") for c in candidates]
  return candidates[starts.index(max(starts))]


_NUMBER_WITH_COMMAS = re.compile(r"-?\b\d{1,3}(?:,\d{3})+\b")
_NUMBER_SCIENTIFIC = re.compile(r"-?\d+(?:\.\d+)?[eE][+-]?\d+")
_NUMBER_SIMPLE = re.compile(r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])")


def extract_numbers(text: str) -> list[str]:
  """Numbers in `text`: with thousands commas, then scientific, then plain (official regexes)."""
  return (_NUMBER_WITH_COMMAS.findall(text) + _NUMBER_SCIENTIFIC.findall(text)
          + _NUMBER_SIMPLE.findall(text))


def _is_number(text: str) -> bool:
  try:
    float(text.replace(",", ""))
    return True
  except ValueError:
    return False


def normalize_mmmu_str(text: str) -> list[str | float]:
  """A number -> [float rounded to 2 decimals]; other text -> [lowercased]; a single
  character -> [" c", "c "] so that it only matches as a separate word."""
  text = text.strip()
  if _is_number(text):
    return [round(float(text.replace(",", "")), 2)]
  text = text.lower()
  return [" " + text, text + " "] if len(text) == 1 else [text]


_KEY_INDICATORS = ("could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result ")
_TRIVIAL = frozenset(":,.!?;'")


def _key_subresponses(response: str) -> list[str]:
  """The tails after answer indicators ("is ", "so ", ...) of each line; "=" too on the last."""
  response = response.strip().strip(".").lower()
  # The reference splits on r"\.\s(?=[A-Z])" after lowercasing, so only newlines split.
  parts = re.split(r"\.\s(?=[A-Z])|\n", response)
  keys = []
  for i, part in enumerate(parts):
    indicators = _KEY_INDICATORS + (("=",) if i == len(parts) - 1 else ())
    shortest = None
    for ind in indicators:
      if ind in part:
        tail = part.split(ind)[-1].strip()
        if not shortest or len(tail) < len(shortest):
          shortest = tail
    if shortest and shortest.strip() not in _TRIVIAL:
      keys.append(shortest)
  return keys or [response]


def parse_mmmu_open(response: str) -> list[str | float]:
  """Free text -> candidate answers (official `parse_open_response`): the key sub-responses
  and every number in them, normalised with `normalize_mmmu_str`, duplicates removed.
  (The reference returns `list(set(...))`; the order here is first-seen, which no
  evaluation depends on.)"""
  keys = _key_subresponses(response)
  preds = list(keys)
  for k in keys:
    preds.extend(extract_numbers(k))
  normalized = [v for p in preds for v in normalize_mmmu_str(p)]
  return list(dict.fromkeys(normalized))


def eval_mmmu_multi_choice(gold: str | Sequence[str], pred: str) -> bool:
  """Exact letter match; a list gold accepts any of its letters."""
  if isinstance(gold, str):
    return gold == pred
  return any(g == pred for g in gold)


def eval_mmmu_open(gold: str | Sequence[str], preds: Sequence[str | float]) -> bool:
  """Official `eval_open`: a string prediction is correct if a normalised string gold is a
  substring of it; a number prediction if it equals a normalised number gold.

  lmms-eval passes the dataset's `answer` string as is, so a gold like "['24/7', '3.429']"
  stays one string; pass a list to accept any of several answers.
  """
  golds = [v for g in ([gold] if isinstance(gold, str) else gold) for v in normalize_mmmu_str(g)]
  for p in preds:
    if isinstance(p, str):
      if any(isinstance(g, str) and g in p for g in golds):
        return True
    elif p in golds:
      return True
  return False


# ------------------------------------------------------------------------------------------
# RealWorldQA
# ------------------------------------------------------------------------------------------

_OPTION_LINE = re.compile(r"\b([A-Z])\.\s+([^\n]*)")


def options_in_question(question: str) -> dict[str, str]:
  """"A. text" options written in a question -> {"A": "text", ...} (lmms-eval's RealWorldQA
  option regex). The letters are the written ones (lmms-eval relabels them A, B, ... in
  order, which a stray "S." as in "U.S." would shift)."""
  return {letter: text.strip() for letter, text in _OPTION_LINE.findall(question)}


def is_letter_answer(gold: str) -> bool:
  g = gold.strip()
  return len(g) == 1 and "A" <= g <= "Z"


def realworldqa_correct(pred: str, gold: str, question: str = "",
                        rng: random.Random | int = MMMU_SEED) -> bool:
  """EVAL.md: a letter gold -> the letter is extracted as for MMMU (choices and option
  texts from the "A. ..." lines of `question`, A-D when it has none); otherwise
  lowercase, strip and drop trailing periods of the prediction, exact match with the
  lowercased, stripped gold (lmms-eval `realworldqa_process_results`)."""
  if is_letter_answer(gold):
    index2ans = options_in_question(question)
    choices = list(index2ans) or ["A", "B", "C", "D"]
    return parse_mmmu_multi_choice(pred, choices, index2ans, rng) == gold.strip()
  return pred.lower().strip().rstrip(".") == gold.lower().strip()
