"""Training-data readers: every file layout -> one normalised record.

A record is `{"id": str, "source": str, "image": bytes | str | None, "messages": [{"role",
"content"}]}`. The image stays raw (encoded bytes or a file path): it is decoded later, in
the pipeline's workers. A row that cannot even be parsed comes back as a `BadRecord` value,
never an exception, so the pipeline can count it and go on.

Each reader is a grain `RandomAccessDataSource` (`__len__`, `__getitem__`, picklable for
worker processes) and also streams (`__iter__`) without building its index:

  llava_json        LLaVA JSON list {id, image, conversations: [{from, value}]} + image root
  sharegpt_text     OpenHermes-2.5 {conversations: [{from, value}]}, JSON list or JSONL
  mathinstruct      MathInstruct {instruction, output}, JSON list or JSONL
  jsonl             users' JSONL: `image` path column, `conversations` or `question`/`answer`
  cauldron_parquet  The Cauldron / Docmatix: `images` [{bytes, path}], `texts` [{user, assistant, source}]
  lnqa_parquet      LNQA: `image` {bytes, path}, `qa` [{question, answer}]
  TfdsSource        a `tfds.data_source` of the synthetic set (tfds_synthetic.py)
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import io
import json
import os
import threading
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from tinyvlm_jax.data import chat

IMAGE_PLACEHOLDER = chat.IMAGE_PLACEHOLDER

Record = dict[str, Any]
# A row parser: (row, id, source name) -> record; raises RecordError (or chat.DropExample) for a bad row.
RowParser = Callable[[Any, str, str], Record]


@dataclasses.dataclass(frozen=True)
class BadRecord:
  """A row that could not be parsed: the pipeline counts it under `reason` and skips it."""
  id: str
  reason: str
  detail: str = ""


class RecordError(ValueError):
  """Raised by row parsers for a malformed row; readers turn it into a `BadRecord`."""

  def __init__(self, reason: str, message: str):
    super().__init__(message)
    self.reason = reason


# ------------------------------------------------------------------------------------------
# Row parsers: one per layout.


def _record(rid: str, source: str, image, messages: list[dict]) -> Record:
  if image is not None:
    messages = with_image_placeholder(messages)
  return {"id": rid, "source": source, "image": image, "messages": messages}


def with_image_placeholder(messages: list[dict]) -> list[dict]:
  """Puts `<image>\\n` before the first user turn unless some turn already holds `<image>`."""
  if any(isinstance(m.get("content"), str) and IMAGE_PLACEHOLDER in m["content"] for m in messages):
    return messages
  out = [dict(m) for m in messages]
  for m in out:
    if m.get("role") == "user" and isinstance(m.get("content"), str):
      m["content"] = f"{IMAGE_PLACEHOLDER}\n{m['content']}"
      break
  return out


def _field(row: Any, key: str, types: type | tuple[type, ...], rid: str):
  if not isinstance(row, dict):
    raise RecordError("bad_format", f"record {rid}: expected a JSON object, got {type(row).__name__}")
  if key not in row or row[key] is None:
    raise RecordError("bad_format", f"record {rid}: missing field {key!r} (fields: {sorted(row)})")
  value = row[key]
  if not isinstance(value, types):
    raise RecordError("bad_format", f"record {rid}: field {key!r} is {type(value).__name__}, expected {types}")
  return value


def _image_path(path: Any, image_root: str | None, rid: str) -> str | None:
  if path is None or path == "":
    return None
  if not isinstance(path, str):
    raise RecordError("bad_format", f"record {rid}: image path is {type(path).__name__}, expected a string")
  return path if image_root is None else os.path.join(image_root, path)


def parse_sharegpt(row: Any, rid: str, source: str, *, image_root: str | None = None) -> Record:
  """LLaVA / ShareGPT4V / ALLaVA / OpenHermes row: optional `image` path, `conversations` [{from, value}]."""
  conversations = _field(row, "conversations", list, rid)
  messages = chat.from_sharegpt(conversations)
  return _record(rid, source, _image_path(row.get("image"), image_root, rid), messages)


def parse_mathinstruct(row: Any, rid: str, source: str) -> Record:
  """MathInstruct row {instruction, output} -> one user and one assistant turn."""
  instruction = _field(row, "instruction", str, rid)
  output = _field(row, "output", str, rid)
  return _record(rid, source, None, [{"role": "user", "content": instruction},
                                     {"role": "assistant", "content": output}])


def parse_image_jsonl(row: Any, rid: str, source: str, *, image_root: str | None = None) -> Record:
  """Users' JSONL row: optional `image` path and either `conversations` or `question`/`answer`."""
  if isinstance(row, dict) and "conversations" in row:
    return parse_sharegpt(row, rid, source, image_root=image_root)
  question = _field(row, "question", str, rid)
  answer = _field(row, "answer", str, rid)
  return _record(rid, source, _image_path(row.get("image"), image_root, rid),
                 [{"role": "user", "content": question}, {"role": "assistant", "content": answer}])


def _parquet_image(value: Any, image_root: str | None, rid: str) -> bytes | str | None:
  """An HF `Image` cell ({bytes, path} struct, raw bytes or a path) -> bytes, a path or None."""
  if value is None:
    return None
  if isinstance(value, (bytes, bytearray)):
    return bytes(value)
  if isinstance(value, str):
    return _image_path(value, image_root, rid)
  if isinstance(value, dict):
    if value.get("bytes") is not None:
      return bytes(value["bytes"])
    return _image_path(value.get("path"), image_root, rid)
  raise RecordError("bad_format", f"record {rid}: image cell is {type(value).__name__}, expected {{bytes, path}}")


def _turn_text(turn: dict, key: str, rid: str) -> str:
  value = turn.get(key)
  if not isinstance(value, str):
    raise RecordError("bad_format", f"record {rid}: turn field {key!r} is {type(value).__name__}, expected a string")
  return value


def parse_cauldron(row: Any, rid: str, source: str, *, image_root: str | None = None) -> Record:
  """The Cauldron / Docmatix row: `images` (the first one is used) and `texts` [{user, assistant}]."""
  images = row.get("images") or []
  texts = _field(row, "texts", list, rid)
  messages = []
  for turn in texts:
    if not isinstance(turn, dict):
      raise RecordError("bad_format", f"record {rid}: a `texts` entry is {type(turn).__name__}, expected a struct")
    messages.append({"role": "user", "content": _turn_text(turn, "user", rid)})
    messages.append({"role": "assistant", "content": _turn_text(turn, "assistant", rid)})
  image = _parquet_image(images[0], image_root, rid) if images else None
  return _record(rid, source, image, messages)


def parse_lnqa(row: Any, rid: str, source: str, *, image_root: str | None = None) -> Record:
  """LNQA row: `image` and `qa` [{question, answer}] -> a multi-turn conversation."""
  qa = _field(row, "qa", list, rid)
  messages = []
  for turn in qa:
    if not isinstance(turn, dict):
      raise RecordError("bad_format", f"record {rid}: a `qa` entry is {type(turn).__name__}, expected a struct")
    messages.append({"role": "user", "content": _turn_text(turn, "question", rid)})
    messages.append({"role": "assistant", "content": _turn_text(turn, "answer", rid)})
  return _record(rid, source, _parquet_image(row.get("image"), image_root, rid), messages)


def _parse_or_bad(parse: RowParser, row: Any, rid: str, source: str) -> Record | BadRecord:
  try:
    return parse(row, rid, source)
  except (RecordError, chat.DropExample) as e:
    return BadRecord(rid, e.reason, str(e))


def _row_id(row: Any, fallback: str) -> str:
  if isinstance(row, dict) and isinstance(row.get("id"), (str, int)) and not isinstance(row.get("id"), bool):
    return str(row["id"])
  return fallback


# ------------------------------------------------------------------------------------------
# Data sources (grain RandomAccessDataSource protocol).


class JsonlSource:
  """A JSONL file, one record per non-blank line; random access through an index of line offsets.

  An invalid JSON line becomes `BadRecord(<file>:<line>, "invalid_json")`. Reads use
  `os.pread`, so grain's reader threads can share the one file descriptor.
  """

  def __init__(self, path: str | os.PathLike, parse: RowParser, *, name: str | None = None):
    self.path = os.fspath(path)
    if not os.path.isfile(self.path):
      raise FileNotFoundError(f"JSONL file {self.path} does not exist")
    self.parse = parse
    self.name = name or os.path.basename(self.path)
    self._index: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # offsets, lengths, line numbers
    self._fd: tuple[int, int] | None = None  # (pid, fd)

  def _build_index(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if self._index is None:
      offsets, lengths, lines, pos = [], [], [], 0
      with open(self.path, "rb") as f:
        for lineno, line in enumerate(f, start=1):
          if line.strip():
            offsets.append(pos)
            lengths.append(len(line))
            lines.append(lineno)
          pos += len(line)
      self._index = (np.asarray(offsets, np.int64), np.asarray(lengths, np.int64), np.asarray(lines, np.int64))
    return self._index

  def __len__(self) -> int:
    return len(self._build_index()[0])

  def _decode(self, raw: bytes, lineno: int) -> Record | BadRecord:
    fallback = f"{self.name}:{lineno}"
    try:
      row = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      return BadRecord(fallback, "invalid_json", f"{self.path} line {lineno}: {e}")
    return _parse_or_bad(self.parse, row, _row_id(row, fallback), self.name)

  def __getitem__(self, index: int) -> Record | BadRecord:
    offsets, lengths, lines = self._build_index()
    index = int(index)
    if not 0 <= index < len(offsets):
      raise IndexError(f"record {index} out of range for {self.path} ({len(offsets)} records)")
    pid = os.getpid()
    if self._fd is None or self._fd[0] != pid:  # (re)open after a fork or in a spawned worker
      self._fd = (pid, os.open(self.path, os.O_RDONLY))
    raw = os.pread(self._fd[1], int(lengths[index]), int(offsets[index]))
    return self._decode(raw, int(lines[index]))

  def __iter__(self) -> Iterator[Record | BadRecord]:
    with open(self.path, "rb") as f:
      for lineno, line in enumerate(f, start=1):
        if line.strip():
          yield self._decode(line, lineno)

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_fd"] = None
    return state

  def __del__(self):
    if getattr(self, "_fd", None) is not None and self._fd[0] == os.getpid():
      os.close(self._fd[1])

  def __repr__(self) -> str:
    return f"JsonlSource({self.path!r}, name={self.name!r})"


class JsonListSource:
  """A JSON file holding one list of records, loaded whole (LLaVA JSON, OpenHermes, MathInstruct)."""

  def __init__(self, path: str | os.PathLike, parse: RowParser, *, name: str | None = None):
    self.path = os.fspath(path)
    self.parse = parse
    self.name = name or os.path.basename(self.path)
    try:
      with open(self.path, "rb") as f:
        rows = json.load(f)
    except FileNotFoundError as e:
      raise FileNotFoundError(f"JSON file {self.path} does not exist") from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise ValueError(f"{self.path} is not valid JSON ({e}); a JSON list of records was expected "
                       f"(for one record per line use a .jsonl file)") from e
    if not isinstance(rows, list):
      raise ValueError(f"{self.path} holds a JSON {type(rows).__name__}, expected a list of records")
    self.rows = rows

  def __len__(self) -> int:
    return len(self.rows)

  def __getitem__(self, index: int) -> Record | BadRecord:
    index = int(index)
    row = self.rows[index]
    return _parse_or_bad(self.parse, row, _row_id(row, f"{self.name}:{index}"), self.name)

  def __iter__(self) -> Iterator[Record | BadRecord]:
    return (self[i] for i in range(len(self)))

  def __repr__(self) -> str:
    return f"JsonListSource({self.path!r}, name={self.name!r}, {len(self)} records)"


class ParquetSource:
  """One or more parquet files; random access through the row-group layout.

  `__getitem__` reads the whole row group holding the row and keeps the last one read
  (per process), so sequential and locally shuffled access stay cheap.
  """

  def __init__(self, paths: str | os.PathLike | Sequence[str | os.PathLike], parse: RowParser, *,
               name: str | None = None):
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not paths:
      raise ValueError("ParquetSource needs at least one parquet file")
    self.paths = [os.fspath(p) for p in paths]
    self.parse = parse
    self.name = name or os.path.basename(self.paths[0])
    # Global row index -> (file, row group): starts[k] is the first row of the k-th group.
    self._groups: list[tuple[int, int]] = []
    starts, total = [], 0
    for f, path in enumerate(self.paths):
      if not os.path.isfile(path):
        raise FileNotFoundError(f"parquet file {path} does not exist")
      meta = pq.ParquetFile(path).metadata
      for g in range(meta.num_row_groups):
        n = meta.row_group(g).num_rows
        if n:
          self._groups.append((f, g))
          starts.append(total)
          total += n
    self._starts = starts
    self._len = total
    self._lock = threading.Lock()
    self._cache: tuple[int, Any] | None = None  # (group number, pyarrow Table)

  def __len__(self) -> int:
    return self._len

  def _group_table(self, k: int):
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
    if self._cache is None or self._cache[0] != k:
      f, g = self._groups[k]
      self._cache = (k, pq.ParquetFile(self.paths[f]).read_row_group(g))
    return self._cache[1]

  def __getitem__(self, index: int) -> Record | BadRecord:
    index = int(index)
    if not 0 <= index < self._len:
      raise IndexError(f"record {index} out of range for {self.name} ({self._len} records)")
    k = bisect.bisect_right(self._starts, index) - 1
    with self._lock:
      table = self._group_table(k)
    row = table.slice(index - self._starts[k], 1).to_pylist()[0]
    return _parse_or_bad(self.parse, row, _row_id(row, f"{self.name}:{index}"), self.name)

  def __iter__(self) -> Iterator[Record | BadRecord]:
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
    index = 0
    for path in self.paths:
      for batch in pq.ParquetFile(path).iter_batches(batch_size=256):
        for row in batch.to_pylist():
          yield _parse_or_bad(self.parse, row, _row_id(row, f"{self.name}:{index}"), self.name)
          index += 1

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_cache"] = None
    del state["_lock"]
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def __repr__(self) -> str:
    return f"ParquetSource({self.paths!r}, name={self.name!r}, {self._len} records)"


def _text(value: Any) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _png_bytes(image: np.ndarray) -> bytes:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  buf = io.BytesIO()
  Image.fromarray(np.asarray(image, np.uint8)).save(buf, format="PNG")
  return buf.getvalue()


class TfdsSource:
  """Wraps a `tfds.data_source` of the synthetic set into normalised records.

  mode "qa": user `<image>\\n{question}`, assistant `{answer}`; mode "caption": user
  `<image>\\n{caption_prompt}`, assistant `{caption}` (stage 1). Text features come back
  from tfds as bytes and are decoded. The image is best read undecoded
  (`decoders={"image": tfds.decode.SkipDecoding()}`, see `tfds_synthetic.data_source`):
  the PNG bytes then go through the pipeline's checks like any other file; a decoded
  array is re-encoded as PNG.
  """

  def __init__(self, data_source, *, name: str = "tfds", mode: str = "qa",
               caption_prompt: str = "Describe the image briefly."):
    if mode not in ("qa", "caption"):
      raise ValueError(f"TfdsSource mode must be 'qa' or 'caption', got {mode!r}")
    self.data_source = data_source
    self.name = name
    self.mode = mode
    self.caption_prompt = caption_prompt

  def __len__(self) -> int:
    return len(self.data_source)

  def __getitem__(self, index: int) -> Record | BadRecord:
    index = int(index)
    ex = self.data_source[index]
    rid = _text(ex["id"]) if "id" in ex else f"{self.name}:{index}"
    image = ex.get("image")
    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3:
      image = _png_bytes(image)
    elif image is not None and not isinstance(image, bytes):
      return BadRecord(rid, "bad_format", f"record {rid}: image is {type(image).__name__}, expected bytes")
    if self.mode == "qa":
      turns = (_text(ex["question"]), _text(ex["answer"]))
    else:
      turns = (self.caption_prompt, _text(ex["caption"]))
    messages = [{"role": "user", "content": turns[0]}, {"role": "assistant", "content": turns[1]}]
    return _record(rid, self.name, image, messages)

  def __iter__(self) -> Iterator[Record | BadRecord]:
    return (self[i] for i in range(len(self)))

  def __repr__(self) -> str:
    return f"TfdsSource({self.name!r}, mode={self.mode!r}, {len(self)} records)"


# ------------------------------------------------------------------------------------------
# Readers by layout.


def _is_json_list(path: str) -> bool:
  """True when the file's first non-blank byte is `[` (a JSON list), False for JSONL."""
  with open(path, "rb") as f:
    while True:
      chunk = f.read(4096)
      if not chunk:
        return False
      stripped = chunk.lstrip()
      if stripped:
        return stripped.startswith(b"[")


def _json_or_jsonl(path: str | os.PathLike, parse: RowParser, name: str | None):
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"data file {path} does not exist")
  cls = JsonListSource if _is_json_list(path) else JsonlSource
  return cls(path, parse, name=name)


def llava_json(path: str | os.PathLike, image_root: str | os.PathLike | None = None, *,
               name: str | None = None) -> JsonListSource | JsonlSource:
  """LLaVA-Pretrain / LLaVA-Instruct / ShareGPT4V / ALLaVA JSON; image paths relative to `image_root`
  (default: the JSON file's folder)."""
  root = os.fspath(image_root) if image_root is not None else os.path.dirname(os.path.abspath(path))
  return _json_or_jsonl(path, functools.partial(parse_sharegpt, image_root=root), name)


def sharegpt_text(path: str | os.PathLike, *, name: str | None = None) -> JsonListSource | JsonlSource:
  """Text-only ShareGPT conversations (OpenHermes-2.5), JSON list or JSONL."""
  return _json_or_jsonl(path, parse_sharegpt, name)


def mathinstruct(path: str | os.PathLike, *, name: str | None = None) -> JsonListSource | JsonlSource:
  """MathInstruct {instruction, output}, JSON list or JSONL."""
  return _json_or_jsonl(path, parse_mathinstruct, name)


def jsonl(path: str | os.PathLike, image_root: str | os.PathLike | None = None, *,
          name: str | None = None) -> JsonlSource | JsonListSource:
  """Users' JSONL with an `image` path column (relative to `image_root`, default the file's folder)
  and `conversations` or `question`/`answer`."""
  root = os.fspath(image_root) if image_root is not None else os.path.dirname(os.path.abspath(path))
  return _json_or_jsonl(path, functools.partial(parse_image_jsonl, image_root=root), name)


def cauldron_parquet(paths, *, image_root: str | os.PathLike | None = None,
                     name: str | None = None) -> ParquetSource:
  """The Cauldron and Docmatix (images config) parquet files."""
  root = None if image_root is None else os.fspath(image_root)
  return ParquetSource(paths, functools.partial(parse_cauldron, image_root=root), name=name)


def lnqa_parquet(paths, *, image_root: str | os.PathLike | None = None, name: str | None = None) -> ParquetSource:
  """LNQA parquet files."""
  root = None if image_root is None else os.fspath(image_root)
  return ParquetSource(paths, functools.partial(parse_lnqa, image_root=root), name=name)
