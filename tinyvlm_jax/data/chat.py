"""ChatML conversations -> token ids and the loss mask (DESIGN 3, EVAL "Loss mask").

Template (Qwen2.5, one line per turn):
  <|im_start|>system\\n{system}<|im_end|>\\n
  <|im_start|>user\\n<image>\\n{question}<|im_end|>\\n
  <|im_start|>assistant\\n{answer}<|im_end|>\\n
`<image>` (first user turn only, moved to the front of that turn as LLaVA does) becomes
`num_image_tokens` copies of `image_token_id`. `loss_mask[t]` is True when token t is a
supervised target: the assistant's text and its closing `<|im_end|>`; the trainer shifts.
Role headers and contents are tokenised separately, contents with special-token strings
treated as plain text, so data cannot inject `<|im_end|>`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

DEFAULT_SYSTEM = "You are a helpful assistant."
IMAGE_PLACEHOLDER = "<image>"
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system"}

# The same format as a transformers chat template (Qwen2's ChatML template), for the PyTorch export.
CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\n" + DEFAULT_SYSTEM + "<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if message['role'] != 'system' %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


class DropExample(ValueError):
  """An example the pipeline skips and counts by `reason`."""

  def __init__(self, reason: str, message: str):
    super().__init__(f"{reason}: {message}")
    self.reason = reason


@dataclasses.dataclass(frozen=True)
class Encoded:
  ids: np.ndarray        # int32 [n], n <= max_len
  loss_mask: np.ndarray  # bool [n]: token t is a supervised target (assistant text and its <|im_end|>)
  has_image: bool        # the ids hold the num_image_tokens image placeholders
  truncated: bool        # later exchanges were dropped or the first answer was cut to fit max_len


def from_sharegpt(conversations: Sequence[dict[str, Any]]) -> list[dict[str, str]]:
  """ShareGPT / LLaVA `[{from, value}]` -> `[{role, content}]` (human -> user, gpt -> assistant)."""
  messages = []
  for i, turn in enumerate(conversations):
    if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
      raise DropExample("bad_content", f"turn {i} is not a {{from, value}} dict: {turn!r:.80}")
    role = SHAREGPT_ROLES.get(str(turn["from"]).lower())
    if role is None:
      raise DropExample("bad_role", f"turn {i} has role {turn['from']!r}; expected one of {sorted(SHAREGPT_ROLES)}")
    messages.append({"role": role, "content": turn["value"]})
  return messages


def _split(messages: Sequence[dict[str, Any]]) -> tuple[str | None, list[tuple[str, str]]]:
  """Validates roles and contents -> (system text or None, [(question, answer)]); a trailing question is dropped."""
  if not messages:
    raise DropExample("empty_conversation", "the conversation has no turns")
  for i, m in enumerate(messages):
    if not isinstance(m, dict) or not isinstance(m.get("content"), str):
      raise DropExample("bad_content", f"turn {i} has no string content: {m!r:.80}")
    if m.get("role") not in ROLES:
      raise DropExample("bad_role", f"turn {i} has role {m.get('role')!r}; expected one of {ROLES}")
  system = None
  if messages[0]["role"] == "system":
    system, messages = messages[0]["content"], messages[1:]
  if not messages:
    raise DropExample("empty_conversation", "the conversation has only a system turn")
  for i, m in enumerate(messages):
    expected = "user" if i % 2 == 0 else "assistant"
    if m["role"] != expected:
      raise DropExample("bad_role", f"turn {i + (system is not None)} has role {m['role']!r}, expected {expected!r} "
                                    f"(system first, then user and assistant alternating)")
  exchanges = [(messages[i]["content"], messages[i + 1]["content"]) for i in range(0, len(messages) - 1, 2)]
  if not exchanges:
    raise DropExample("no_assistant_turn", "the conversation has no assistant turn to learn from")
  return system, exchanges


def _image_question(exchanges: list[tuple[str, str]]) -> tuple[bool, str]:
  """Checks `<image>` placement -> (has_image, first question without the placeholder)."""
  count = sum(q.count(IMAGE_PLACEHOLDER) + a.count(IMAGE_PLACEHOLDER) for q, a in exchanges)
  first = exchanges[0][0]
  if count == 0:
    return False, first
  if count > 1:
    raise DropExample("too_many_images", f"{count} {IMAGE_PLACEHOLDER} placeholders; one image per example")
  if IMAGE_PLACEHOLDER not in first:
    raise DropExample("misplaced_image", f"{IMAGE_PLACEHOLDER} must be in the first user turn")
  return True, first.replace(IMAGE_PLACEHOLDER, "").strip()


class _Builder:
  """Turn-level id and mask pieces of the template."""

  def __init__(self, tok, num_image_tokens: int, image_token_id: int):
    self.tok = tok
    self.image = [image_token_id] * num_image_tokens
    self.newline = tok.encode("\n", special=False)

  def head(self, role: str) -> list[int]:
    return [self.tok.im_start_id] + self.tok.encode(f"{role}\n", special=False)

  def text(self, content: str) -> list[int]:
    return self.tok.encode(content, special=False) if content else []

  def turn(self, role: str, content: str, *, image: bool = False) -> tuple[list[int], list[bool]]:
    """One whole turn; the assistant's content and <|im_end|> are supervised."""
    head = self.head(role)
    body = (self.image + (self.text("\n" + content) if content else [])) if image else self.text(content)
    tail = [self.tok.im_end_id]
    sup = role == "assistant"
    ids = head + body + tail + self.newline
    mask = [False] * len(head) + [sup] * (len(body) + 1) + [False] * len(self.newline)
    return ids, mask


def encode_chat(messages: Sequence[dict[str, Any]], tok, *, max_len: int, num_image_tokens: int,
                image_token_id: int, system: str | None = DEFAULT_SYSTEM, caption_only: bool = False) -> Encoded:
  """A conversation `[{role, content}]` -> `Encoded` ids and loss mask of at most `max_len` tokens.

  A system turn in the data overrides `system`; `system=None` and none in the data: no system
  turn. Only `<image>` in the first user turn is accepted (callers add it for image data sets
  whose texts lack it). Truncation drops whole later exchanges first; only when the first
  exchange does not fit is its answer cut, and if no answer token fits, DropExample("too_long").
  The image placeholders are never cut. `caption_only` (stage 1): the first exchange only,
  an image required; the caption (answer) and its <|im_end|> carry the loss.

  Raises:
    DropExample: reason "empty_conversation", "bad_role", "bad_content", "no_assistant_turn",
      "too_many_images", "misplaced_image", "no_image" (caption_only) or "too_long".
  """
  data_system, exchanges = _split(messages)
  if data_system is not None:
    system = data_system
  has_image, first_question = _image_question(exchanges)
  if caption_only:
    if not has_image:
      raise DropExample("no_image", "caption_only needs an <image> in the first user turn")
    exchanges = exchanges[:1]
  b = _Builder(tok, num_image_tokens, image_token_id)

  ids, mask = b.turn("system", system) if system is not None else ([], [])
  truncated = False
  for k, (question, answer) in enumerate(exchanges):
    q_ids, q_mask = b.turn("user", first_question if k == 0 else question, image=has_image and k == 0)
    a_ids, a_mask = b.turn("assistant", answer)
    room = max_len - len(ids) - len(q_ids)
    if room >= len(a_ids):
      ids, mask = ids + q_ids + a_ids, mask + q_mask + a_mask
      continue
    truncated = True
    if k > 0:
      break  # drop this exchange and all later ones
    if not any(a_mask[:max(room, 0)]):
      raise DropExample("too_long", f"the first answer does not fit in max_len={max_len}: system and first question "
                                    f"take {len(ids) + len(q_ids)} tokens, the answer turn {len(a_ids)}")
    ids, mask = ids + q_ids + a_ids[:room], mask + q_mask + a_mask[:room]
    break
  return Encoded(ids=np.asarray(ids, np.int32), loss_mask=np.asarray(mask, bool), has_image=has_image,
                 truncated=truncated)


def encode_prompt(question: str, tok, *, num_image_tokens: int, image_token_id: int,
                  system: str | None = DEFAULT_SYSTEM, with_image: bool = True) -> np.ndarray:
  """The generation prompt: system, the user turn (image first), then `<|im_start|>assistant\\n`. -> int32 [n]."""
  count = question.count(IMAGE_PLACEHOLDER)
  if count > 1 or (count and not with_image):
    raise ValueError(f"question holds {count} {IMAGE_PLACEHOLDER} placeholder(s) with with_image={with_image}")
  b = _Builder(tok, num_image_tokens, image_token_id)
  ids = b.turn("system", system)[0] if system is not None else []
  if with_image:
    question = question.replace(IMAGE_PLACEHOLDER, "").strip()
  ids = ids + b.turn("user", question, image=with_image)[0] + b.head("assistant")
  return np.asarray(ids, np.int32)
