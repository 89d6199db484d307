"""Metrics worked by hand from their definitions (lmms-eval v0.2.4, LLaVA eval_pope, MMMU)."""

import random

import pytest

from tinyvlm_jax.eval import metrics as m


# ------------------------------------------------------------------------------------------
# VQA
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("raw, expected", [
    ("Two", "2"),                    # number words -> digits
    ("two dogs", "2 dogs"),
    ("none", "0"),                   # in the reference number table too
    ("ten", "10"),
    ("the cat", "cat"),              # articles dropped
    ("A dog on an island", "dog on island"),
    ("yes.", "yes"),                 # a period not followed by a digit goes
    ("Yes!", "yes"),                 # "!" without a neighbouring space -> space
    ("3.5", "3.5"),                  # a decimal point stays
    ("1,000", "1000"),               # "," is dropped first
    ("dont", "don't"),               # contractions
    ("isnt it", "isn't it"),
    ("x-ray", "x ray"),              # "-" with no space next to it -> space
    ("black - white", "black white"),  # "-" next to a space -> deleted
    ("dog's", "dog 's"),             # "'s" split off
    ("  new\nline\tend ", "new line end"),
])
def test_normalize_vqa_answer(raw, expected):
  assert m.normalize_vqa_answer(raw) == expected


def test_contraction_table_oddities_are_the_reference_ones():
  assert m.CONTRACTIONS["somebody'd"] == "somebodyd"
  assert m.CONTRACTIONS["yall'd've"] == "y'all'd've"
  assert len(m.CONTRACTIONS) == 120


@pytest.mark.parametrize("n_said, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_accuracy_leave_one_out(n_said, expected):
  # n humans said "two"/"2", the rest "3". For each human i: min(1, matches among the other 9 / 3).
  # n = 2: the 2 matching humans see 1 other match (1/3), the 8 others see 2 (2/3):
  #   (2 * 1/3 + 8 * 2/3) / 10 = 0.6.
  answers = (["two", "2"] * 5)[:n_said] + ["3"] * (10 - n_said)
  assert m.vqa_accuracy("Two.", answers) == pytest.approx(expected, abs=1e-12)
  assert m.vqa_accuracy("Two.", answers, textvqa=True) == pytest.approx(expected, abs=1e-12)


def test_vqa_accuracy_vqav2_vs_textvqa_answer_processing():
  # VQAv2 (lmms-eval): identical human answers are left unprocessed, so "Yes" never matches
  # the processed prediction "yes"; TextVQA processes every answer (lowercase first).
  assert m.vqa_accuracy("yes", ["Yes"] * 10) == 0.0
  assert m.vqa_accuracy("yes", ["Yes"] * 10, textvqa=True) == 1.0
  # Once answers differ, VQAv2 runs only the punctuation and digit/article steps on them:
  # "The dog." -> "dog" matches, but "'s" is not split off the answers (it is off the
  # prediction), so "dog's" never matches "dog 's"; TextVQA splits both.
  answers = ["The dog."] * 3 + ["cat"] * 7
  assert m.vqa_accuracy("dog", answers) == pytest.approx(0.9)
  answers = ["dog's"] * 3 + ["cat"] * 7
  assert m.vqa_accuracy("dog's", answers) == 0.0
  assert m.vqa_accuracy("dog's", answers, textvqa=True) == pytest.approx(0.9)


def test_vqa_accuracy_needs_answers():
  with pytest.raises(ValueError, match="at least one"):
    m.vqa_accuracy("yes", [])


# ------------------------------------------------------------------------------------------
# POPE
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("No, there is not.", "no"),
    ("Yes. There is", "yes"),
    ("Yes. There is no dog.", "yes"),   # only the first sentence counts
    ("There is not a cat in the image", "no"),
    ("no", "no"),
    ("  No\n", "no"),
    ("Yes", "yes"),
    ("NO", "yes"),                      # LLaVA matches only "No", "no", "not"
    ("I see a dog", "yes"),
])
def test_parse_pope(text, expected):
  assert m.parse_pope(text) == expected


def test_pope_scores_hand_computed():
  # random: preds y y n n y vs golds y n n y y -> TP 2, FP 1, TN 1, FN 1.
  # adversarial: preds n n y vs golds y n n -> TP 0, FP 1, TN 1, FN 1.
  preds = ["Yes, there is.", "yes", "No, there is not.", "no", "Yes",
           "No.", "There is no dog.", "yes"]
  golds = ["yes", "no", "no", "yes", "YES", "yes", "no", "no"]
  cats = ["random"] * 5 + ["adversarial"] * 3
  s = m.pope_scores(preds, golds, cats)
  r, a, o = s["random"], s["adversarial"], s["overall"]
  assert r["accuracy"] == pytest.approx(3 / 5)
  assert r["precision"] == pytest.approx(2 / 3)
  assert r["recall"] == pytest.approx(2 / 3)
  assert r["f1"] == pytest.approx(2 / 3)
  assert r["yes_ratio"] == pytest.approx(3 / 5)
  assert r["n"] == 5
  assert a["accuracy"] == pytest.approx(1 / 3)
  assert (a["precision"], a["recall"], a["f1"]) == (0.0, 0.0, 0.0)
  assert a["yes_ratio"] == pytest.approx(1 / 3)
  # overall: TP 2, FP 2, TN 2, FN 2.
  assert o["accuracy"] == o["precision"] == o["recall"] == o["f1"] == o["yes_ratio"] == pytest.approx(0.5)
  assert o["n"] == 8
  assert s["mean"]["f1"] == pytest.approx(1 / 3)
  assert list(s) == ["random", "adversarial", "overall", "mean"]


def test_pope_scores_rejects_bad_gold():
  with pytest.raises(ValueError, match="gold answer #1 is 'maybe'"):
    m.pope_scores(["yes", "no"], ["yes", "maybe"], ["random", "random"])


# ------------------------------------------------------------------------------------------
# MMMU
# ------------------------------------------------------------------------------------------

CHOICES, INDEX2ANS = m.mmmu_choices(["red car", "blue car", "dog", "cat"])


def test_mmmu_choices():
  assert CHOICES == ["A", "B", "C", "D"]
  assert INDEX2ANS == {"A": "red car", "B": "blue car", "C": "dog", "D": "cat"}


@pytest.mark.parametrize("response, expected", [
    ("(B)", "B"),
    ("B.", "B"),
    ("B", "B"),
    ("B. blue car", "B"),                       # "B." pass
    ("The answer is B", "B"),                   # "B " pass
    ("The answer is (C).", "C"),
    ("(A) is wrong, so the answer is (C)", "C"),  # several: the one found last
    ("A or D? I would say D", "D"),
    ("I am fairly sure it shows a blue car.", "B"),  # > 5 words: option text
    ("not the red car but the blue car, surely", "B"),  # both texts: the later one
])
def test_parse_mmmu_multi_choice(response, expected):
  assert m.parse_mmmu_multi_choice(response, CHOICES, INDEX2ANS) == expected


def test_parse_mmmu_multi_choice_random_fallback_is_seeded():
  # "a car" (2 words, lowercase) matches no rule -> random choice.
  for seed in range(5):
    first = m.parse_mmmu_multi_choice("a car", CHOICES, INDEX2ANS, seed)
    assert first == m.parse_mmmu_multi_choice("a car", CHOICES, INDEX2ANS, seed)
    assert first == random.Random(seed).choice(CHOICES)
  assert len({m.parse_mmmu_multi_choice("a car", CHOICES, INDEX2ANS, s) for s in range(20)}) > 1
  # A shared Random is consumed: the sequence equals that of a fresh Random(3).
  rng, ref = random.Random(3), random.Random(3)
  assert [m.parse_mmmu_multi_choice("??", CHOICES, INDEX2ANS, rng) for _ in range(6)] == \
         [ref.choice(CHOICES) for _ in range(6)]


def test_parse_mmmu_open_numbers_and_strings():
  assert m.parse_mmmu_open("The answer is 42.") == [42.0]
  # "1,000" is read with its comma and, by the plain-number pattern, "000" after it.
  assert set(m.parse_mmmu_open("The total is 1,000 dollars")) == {"1,000 dollars", 1000.0, 0.0}
  assert m.parse_mmmu_open("The color is blue.") == ["blue"]
  assert m.parse_mmmu_open("Therefore x = 3.14159") == [3.14]  # "=" tail, a number: rounded
  assert m.parse_mmmu_open("so the speed is 5 m/s") == ["5 m/s", 5.0]
  assert m.parse_mmmu_open("Paris") == ["paris"]  # no indicator: the whole response


def test_eval_mmmu_open():
  assert m.eval_mmmu_open("42", m.parse_mmmu_open("The answer is 42."))
  assert m.eval_mmmu_open("42.001", [42.0])          # golds are rounded to 2 decimals
  assert not m.eval_mmmu_open("43", [42.0])
  assert m.eval_mmmu_open("1000", m.parse_mmmu_open("The total is 1,000 dollars"))
  assert m.eval_mmmu_open("Blue", m.parse_mmmu_open("The color is blue."))  # substring of the pred
  assert m.eval_mmmu_open("blue", ["light blue"])
  assert not m.eval_mmmu_open("red", ["blue"])
  assert not m.eval_mmmu_open("x", ["x"])            # one character must stand apart: " x" / "x "
  assert m.eval_mmmu_open("x", ["x = 5"])
  assert m.eval_mmmu_open(["7", "seven"], [7.0])     # a list gold accepts any


def test_eval_mmmu_multi_choice():
  assert m.eval_mmmu_multi_choice("B", "B")
  assert not m.eval_mmmu_multi_choice("B", "C")
  assert m.eval_mmmu_multi_choice(["A", "C"], "C")


# ------------------------------------------------------------------------------------------
# RealWorldQA
# ------------------------------------------------------------------------------------------

RWQA_Q = ("Which way should the car go?\nA. Left\nB. Right\nC. Straight\n"
          "Please answer directly with only the letter of the correct option and nothing else.")


def test_options_in_question():
  assert m.options_in_question(RWQA_Q) == {"A": "Left", "B": "Right", "C": "Straight"}


@pytest.mark.parametrize("pred, gold, expected", [
    ("B", "B", True),
    ("B.", "B", True),
    ("(B)", "B", True),
    ("(C)", "B", False),
    ("The car should turn right and then stop.", "B", True),  # option text, > 5 words
    ("2.", "2", True),        # free text: lowercase, strip, trailing periods dropped
    (" 2 ", "2", True),
    ("two", "2", False),
    ("Yes", "yes", True),
    ("yes, it is", "yes", False),
])
def test_realworldqa_correct(pred, gold, expected):
  assert m.realworldqa_correct(pred, gold, RWQA_Q) is expected
