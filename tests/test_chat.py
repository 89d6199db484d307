"""ChatML encoding: exact ids, the loss mask, truncation and the drop reasons."""

import collections

import numpy as np
import pytest

from tinyvlm_jax.data.chat import DropExample, encode_chat, encode_prompt, from_sharegpt
from tinyvlm_jax.data.tokenizer import load_tokenizer
from tinyvlm_jax.presets import model_config

IM_START, IM_END, NL = 151644, 151645, 198
SYSTEM_TURN = [IM_START, 8948, 198, 2610, 525, 264, 10950, 17847, 13, IM_END, NL]  # "system\nYou are a helpful assistant."


@pytest.fixture(scope="module")
def tok():
  return load_tokenizer()


def _enc(messages, tok, max_len=4096, n_img=3, **kw):
  return encode_chat(messages, tok, max_len=max_len, num_image_tokens=n_img, image_token_id=tok.image_pad_id, **kw)


def _runs(mask):
  """[(start, end)] of the True runs of a boolean mask."""
  edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(int), [0]])))
  return list(zip(edges[::2], edges[1::2]))


def test_exact_ids_of_a_known_conversation(tok):
  img = tok.image_pad_id
  enc = _enc([{"role": "user", "content": "<image>\nWhat color?"}, {"role": "assistant", "content": "Red."}], tok)
  expected = SYSTEM_TURN + [IM_START, 872, NL, img, img, img, NL, 3838, 1894, 30, IM_END, NL,
                            IM_START, 77091, NL, 6033, 13, IM_END, NL]
  assert enc.ids.dtype == np.int32 and enc.ids.tolist() == expected
  assert enc.loss_mask.tolist() == [False] * (len(expected) - 4) + [True, True, True, False]
  assert enc.has_image and not enc.truncated
  assert tok.decode(enc.ids[enc.loss_mask]) == "Red.<|im_end|>"


def test_placeholder_expands_to_the_models_visual_token_count(tok):
  cfg = model_config("tinyvlm_0p6b")
  n = cfg.num_visual_tokens
  messages = [{"role": "user", "content": "Describe.\n<image>"}, {"role": "assistant", "content": "A cat."}]
  enc = encode_chat(messages, tok, max_len=2048, num_image_tokens=n, image_token_id=cfg.image_token_id)
  where = np.flatnonzero(enc.ids == cfg.image_token_id)
  assert len(where) == n and where[-1] - where[0] == n - 1  # one contiguous block
  assert not enc.loss_mask[where].any()
  # "<image>" anywhere in the first turn is moved to its front (LLaVA's convention)
  front = [{"role": "user", "content": "<image>\nDescribe."}, messages[1]]
  np.testing.assert_array_equal(enc.ids, encode_chat(front, tok, max_len=2048, num_image_tokens=n,
                                                     image_token_id=cfg.image_token_id).ids)


def test_loss_mask_is_exactly_the_assistant_turns(tok):
  messages = [{"role": "system", "content": "Be brief."},
              {"role": "user", "content": "<image>\nWhat colour is the sky?"},
              {"role": "assistant", "content": "Blue."},
              {"role": "user", "content": "And grass?"},
              {"role": "assistant", "content": "Green, like 🍀 leaves.\nMostly."}]
  enc = _enc(messages, tok)
  runs = _runs(enc.loss_mask)
  assert [tok.decode(enc.ids[a:b]) for a, b in runs] == ["Blue.<|im_end|>", "Green, like 🍀 leaves.\nMostly.<|im_end|>"]
  for a, _ in runs:  # each supervised run follows "<|im_start|>assistant\n"
    assert tok.decode(enc.ids[a - 3:a]) == "<|im_start|>assistant\n"
  text = tok.decode(enc.ids).replace("<|image_pad|>" * 3, "<image>")
  assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n<image>\nWhat colour is the sky?<|im_end|>\n"
                  "<|im_start|>assistant\nBlue.<|im_end|>\n<|im_start|>user\nAnd grass?<|im_end|>\n"
                  "<|im_start|>assistant\nGreen, like 🍀 leaves.\nMostly.<|im_end|>\n")
  # no system: no system turn at all; text-only: no image tokens
  bare = _enc(messages[3:], tok, system=None)
  assert tok.decode(bare.ids).startswith("<|im_start|>user\nAnd grass?") and not bare.has_image
  # special-token strings inside contents stay text: one <|im_end|> per turn
  tricky = _enc([{"role": "user", "content": "Say <|im_end|>"}, {"role": "assistant", "content": "<|im_end|> ok"}], tok)
  assert (tricky.ids == IM_END).sum() == 3
  assert tok.decode(tricky.ids[tricky.loss_mask]) == "<|im_end|> ok<|im_end|>"


def test_truncation_drops_later_turns_then_cuts_the_first_answer(tok):
  long_answer = " ".join(f"word{i}" for i in range(60))
  messages = [{"role": "user", "content": "<image>\nQ1?"}, {"role": "assistant", "content": long_answer},
              {"role": "user", "content": "Q2?"}, {"role": "assistant", "content": "A2."}]
  full = _enc(messages, tok, n_img=50)
  first = _enc(messages[:2], tok, n_img=50)
  assert not _enc(messages, tok, max_len=len(full.ids), n_img=50).truncated
  dropped = _enc(messages, tok, max_len=len(full.ids) - 1, n_img=50)
  assert dropped.truncated
  np.testing.assert_array_equal(dropped.ids, first.ids)
  np.testing.assert_array_equal(dropped.loss_mask, first.loss_mask)

  answer_start = _runs(first.loss_mask)[0][0]
  cut = _enc(messages, tok, max_len=answer_start + 10, n_img=50)
  assert cut.truncated and len(cut.ids) == answer_start + 10
  assert (cut.ids == tok.image_pad_id).sum() == 50  # the placeholder block is never cut
  assert cut.loss_mask[answer_start:].all() and not cut.loss_mask[:answer_start].any()
  assert long_answer.startswith(tok.decode(cut.ids[answer_start:]))

  with pytest.raises(DropExample) as e:
    _enc(messages, tok, max_len=answer_start, n_img=50)  # not one answer token fits
  assert e.value.reason == "too_long"
  with pytest.raises(DropExample) as e:
    _enc(messages, tok, max_len=40, n_img=50)  # the image alone is longer
  assert e.value.reason == "too_long"


def test_drop_reasons_are_counted(tok):
  u = lambda c: {"role": "user", "content": c}  # noqa: E731
  a = lambda c: {"role": "assistant", "content": c}  # noqa: E731
  cases = {
      "ok": [u("<image>\nHi"), a("Hello.")],
      "empty_conversation": [],
      "only_system": [{"role": "system", "content": "x"}],
      "assistant_first": [a("Hello."), u("Hi")],
      "two_users": [u("Hi"), u("Hi again"), a("Hello.")],
      "system_in_middle": [u("Hi"), {"role": "system", "content": "x"}, a("Hello.")],
      "unknown_role": [u("Hi"), {"role": "tool", "content": "x"}],
      "no_answer": [u("<image>\nHi")],
      "two_images": [u("<image>\nHi <image>"), a("Hello.")],
      "late_image": [u("Hi"), a("Hello."), u("<image>\nAnd this?"), a("A dog.")],
      "not_text": [u("Hi"), {"role": "assistant", "content": None}],
      "too_long": [u("<image>\n" + "very " * 50 + "long?"), a("Yes.")],
  }
  counts = collections.Counter()
  for name, messages in cases.items():
    try:
      _enc(messages, tok, max_len=48)
      counts["kept"] += 1
    except DropExample as e:
      counts[e.reason] += 1
  assert counts == {"kept": 1, "empty_conversation": 2, "bad_role": 4, "no_assistant_turn": 1, "too_many_images": 1,
                    "misplaced_image": 1, "bad_content": 1, "too_long": 1}


def test_trailing_question_is_dropped(tok):
  base = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
  np.testing.assert_array_equal(_enc(base + [{"role": "user", "content": "More?"}], tok).ids, _enc(base, tok).ids)


def test_caption_only(tok):
  messages = [{"role": "user", "content": "<image>\nDescribe the image briefly."},
              {"role": "assistant", "content": "A red circle on the left."},
              {"role": "user", "content": "What else?"}, {"role": "assistant", "content": "Nothing."}]
  enc = _enc(messages, tok, caption_only=True)
  assert tok.decode(enc.ids[enc.loss_mask]) == "A red circle on the left.<|im_end|>"
  assert "What else?" not in tok.decode(enc.ids)
  bare = _enc([{"role": "user", "content": "<image>"}, messages[1]], tok, caption_only=True, system=None)
  assert tok.decode(bare.ids) == ("<|im_start|>user\n" + "<|image_pad|>" * 3 + "<|im_end|>\n"
                                  "<|im_start|>assistant\nA red circle on the left.<|im_end|>\n")
  with pytest.raises(DropExample) as e:
    _enc([{"role": "user", "content": "Hi"}, messages[1]], tok, caption_only=True)
  assert e.value.reason == "no_image"


def test_prompt_is_the_training_prefix(tok):
  messages = [{"role": "user", "content": "<image>\nWhat shape is in the image?"},
              {"role": "assistant", "content": "circle"}]
  enc = _enc(messages, tok, n_img=4)
  prompt = encode_prompt("What shape is in the image?", tok, num_image_tokens=4, image_token_id=tok.image_pad_id)
  assert prompt.dtype == np.int32 and prompt[-3:].tolist() == [IM_START, 77091, NL]
  np.testing.assert_array_equal(enc.ids[:len(prompt)], prompt)
  assert enc.loss_mask[len(prompt)] and not enc.loss_mask[:len(prompt)].any()
  text_only = encode_prompt("Hi", tok, num_image_tokens=4, image_token_id=tok.image_pad_id, with_image=False)
  assert tok.image_pad_id not in text_only.tolist()


def test_from_sharegpt():
  conv = [{"from": "system", "value": "s"}, {"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]
  assert from_sharegpt(conv) == [{"role": "system", "content": "s"}, {"role": "user", "content": "<image>\nq"},
                                 {"role": "assistant", "content": "a"}]
  with pytest.raises(DropExample) as e:
    from_sharegpt([{"from": "bot", "value": "x"}])
  assert e.value.reason == "bad_role" and "'bot'" in str(e.value)
  with pytest.raises(DropExample) as e:
    from_sharegpt([{"from": "human"}])
  assert e.value.reason == "bad_content"
