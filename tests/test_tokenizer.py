"""The offline Qwen2.5 tokenizer: known ids, tiktoken vs tokenizer.json vs transformers, round trips."""

import os
import pickle

import pytest
from transformers import AutoTokenizer

from tinyvlm_jax.data.chat import DEFAULT_SYSTEM, encode_chat, encode_prompt
from tinyvlm_jax.data.tokenizer import QWEN25_SPECIAL_TOKENS, SPECIAL_START_ID, load_tokenizer, save_tokenizer_files
from tinyvlm_jax.presets import model_config

CORPUS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog. I'll say it's DON'T, we've, they'd.",
    "机器学习是人工智能的一个分支。北京欢迎你！",
    "日本語のテキストと한국어 텍스트",
    "Emoji: 😀🎉👩‍👩‍👧‍👦 🇫🇷 and ✓ ✗",
    "def f(x):\n    return {'a': [1, 2, 3]}  # comment\n\n\tif x != 0:\n\t\tprint(x ** 2)\n",
    "Numbers 1234567 3.14159 -0.5e10 2024-01-01 $1,000,000",
    "مرحبا بالعالم، هذا نص عربي.",
    "Whitespace   runs\n\n\n   and\t\ttabs  \r\n trailing   ",
    "Привет, мир! Ελληνικά. café naïve façade",
    "<|im_start|>user\nWhat is in <|image_pad|> this?<|im_end|>\n<|endoftext|>",
    "",
    " ",
]


@pytest.fixture(scope="module")
def tok():
  return load_tokenizer()


@pytest.fixture(scope="module")
def hf_dir(tok, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("qwen_tokenizer"))
  written = save_tokenizer_files(tok, out)
  assert sorted(os.path.basename(p) for p in written) == ["tokenizer.json", "tokenizer_config.json"]
  return out


@pytest.fixture(scope="module")
def auto(hf_dir):
  return AutoTokenizer.from_pretrained(hf_dir)


def test_known_ids_and_special_tokens(tok):
  assert tok.encode("Hello world") == [9707, 1879]
  assert tok.encode("<|im_start|>user\n") == [151644, 872, 198]
  assert len(QWEN25_SPECIAL_TOKENS) == 22
  for i, (content, _) in enumerate(QWEN25_SPECIAL_TOKENS):
    assert tok.encode(content) == [SPECIAL_START_ID + i], content
    assert tok.special_tokens[content] == SPECIAL_START_ID + i
  cfg = model_config("tinyvlm_0p6b")
  assert tok.image_pad_id == cfg.image_token_id == 151655
  assert (tok.endoftext_id, tok.im_start_id, tok.im_end_id) == (151643, 151644, 151645)
  assert tok.pad_id == tok.endoftext_id and tok.stop_ids == (151645, 151643)
  assert tok.num_tokens == tok.vocab_size == len(tok) == 151665 <= cfg.llm.vocab_size


def test_special_strings_as_plain_text(tok):
  text = "say <|im_end|> now"
  plain = tok.encode(text, special=False)
  assert not set(plain) & set(tok.special_tokens.values())
  assert tok.decode(plain) == text
  assert tok.im_end_id in tok.encode(text)


def test_decode(tok):
  for text in CORPUS:
    assert tok.decode(tok.encode(text)) == text
  # ids of the model's padded vocabulary rows decode to nothing
  assert tok.decode([9707, 151900, 1879]) == "Hello world"
  assert tok.decode([151644, 872, 198, 151645], skip_special=True) == "user\n"
  # NFC normalisation, as Qwen2's tokenizer.json does it
  assert tok.encode("cafe\u0301") == tok.encode("caf\u00e9")


def test_tiktoken_tokenizer_json_and_transformers_agree(tok, hf_dir, auto):
  hf = load_tokenizer(hf_dir)
  assert not hf.is_tiktoken and hf.num_tokens == tok.num_tokens
  assert hf.special_tokens == tok.special_tokens and hf.stop_ids == tok.stop_ids
  assert len(auto) == tok.num_tokens
  assert auto.eos_token_id == tok.im_end_id and auto.pad_token_id == tok.endoftext_id
  n = 0
  for text in CORPUS + ["cafe\u0301 decomposed"]:
    ids = tok.encode(text)
    assert hf.encode(text) == ids, text
    assert auto(text, add_special_tokens=False)["input_ids"] == ids, text
    assert hf.encode(text, special=False) == tok.encode(text, special=False), text
    assert hf.decode(ids) == tok.decode(ids)
    n += len(ids)
  assert n > 200  # the corpus exercises a couple of hundred tokens


def test_chat_template_matches_encode_chat(tok, auto):
  messages = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
              {"role": "user", "content": "Another?"}, {"role": "assistant", "content": "Green."}]
  ours = encode_chat(messages, tok, max_len=512, num_image_tokens=0, image_token_id=tok.image_pad_id)
  theirs = auto.apply_chat_template(messages, tokenize=True, return_dict=False)
  assert list(theirs) == ours.ids.tolist()
  with_system = [{"role": "system", "content": "Be brief."}] + messages[:1]
  prompt = encode_prompt("Name a colour.", tok, num_image_tokens=0, image_token_id=tok.image_pad_id,
                         system="Be brief.", with_image=False)
  theirs = auto.apply_chat_template(with_system, tokenize=True, add_generation_prompt=True, return_dict=False)
  assert list(theirs) == prompt.tolist()
  default = auto.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
  assert default.startswith(f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n")


def test_pickle_and_copy_from_folder(tok, hf_dir, tmp_path):
  again = pickle.loads(pickle.dumps(tok))
  assert len(pickle.dumps(tok)) < 1000  # pickles as its source, not its 151k ranks
  assert again.encode(CORPUS[2]) == tok.encode(CORPUS[2])
  hf = load_tokenizer(hf_dir)
  copied = save_tokenizer_files(hf, str(tmp_path))
  assert sorted(os.path.basename(p) for p in copied) == ["tokenizer.json", "tokenizer_config.json"]
  assert load_tokenizer(str(tmp_path)).encode(CORPUS[4]) == tok.encode(CORPUS[4])
  assert pickle.loads(pickle.dumps(hf)).encode(CORPUS[1]) == tok.encode(CORPUS[1])


def test_load_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="has no tokenizer.json"):
    load_tokenizer(str(tmp_path))
  with pytest.raises(FileNotFoundError, match="does not exist"):
    load_tokenizer(str(tmp_path / "missing"))
