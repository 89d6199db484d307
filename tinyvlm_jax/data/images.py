"""Image decoding and the model's pixel inputs (DESIGN 1.1).

`load_image` turns a file, bytes or a file object into a checked RGB uint8 PIL image;
`preprocess` turns that into the SigLIP views and the CNN view (`preprocess_uint8` stops before
normalisation: data workers send those and `normalize_vit` / `normalize_cnn` finish the job).
Resizing is PIL bicubic on uint8, then rescale by 1/255 and normalise, exactly as transformers'
`SiglipImageProcessorPil` does it, so the global view is bit-identical to it.
"""

from __future__ import annotations

import io
import os
import struct
from typing import IO, Sequence, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from tinyvlm_jax.models.config import TinyVLMConfig
from tinyvlm_jax.presets import IMAGENET_MEAN, IMAGENET_STD, SIGLIP_MEAN, SIGLIP_STD

# A sensible limit for training data: 64 megapixels (PIL warns above 89 M and refuses above 179 M).
DEFAULT_MAX_PIXELS = 64_000_000

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, IO[bytes], Image.Image, np.ndarray]

REASONS = ("corrupt_image", "missing_image", "zero_size_image", "image_too_large")


class ImageError(ValueError):
  """An image that cannot be used; `reason` is one of `REASONS`, the message names the source."""

  def __init__(self, reason: str, message: str):
    if reason not in REASONS:
      raise ValueError(f"unknown ImageError reason {reason!r}; expected one of {REASONS}")
    super().__init__(message)
    self.reason = reason


def _describe(source, name: str | None) -> str:
  if name is not None:
    return str(name)
  if isinstance(source, (str, os.PathLike)):
    return os.fspath(source)
  if isinstance(source, (bytes, bytearray, memoryview)):
    return f"<{len(source)} bytes>"
  if isinstance(source, np.ndarray):
    return f"<array {source.shape} {source.dtype}>"
  return str(getattr(source, "name", None) or f"<{type(source).__name__}>")


def _header_size(head: bytes) -> tuple[int, int] | None:
  """(width, height) from a PNG, GIF, JPEG or WebP header, or None.

  Only used to tell a zero-size image apart from a corrupt one: PIL refuses to identify
  images with a zero side at all.
  """
  try:
    if head.startswith(b"\x89PNG\r\n\x1a\n") and head[12:16] == b"IHDR":
      return struct.unpack(">II", head[16:24])
    if head[:6] in (b"GIF87a", b"GIF89a"):
      return struct.unpack("<HH", head[6:10])
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
      kind = head[12:16]
      if kind == b"VP8X":
        return (int.from_bytes(head[24:27], "little") + 1, int.from_bytes(head[27:30], "little") + 1)
      if kind == b"VP8L":
        bits = int.from_bytes(head[21:25], "little")
        return ((bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1)
      if kind == b"VP8 ":
        w, h = struct.unpack("<HH", head[26:30])
        return (w & 0x3FFF, h & 0x3FFF)
    if head.startswith(b"\xff\xd8"):
      i = 2
      while i + 9 <= len(head):
        if head[i] != 0xFF:
          return None
        marker = head[i + 1]
        if marker in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF):
          h, w = struct.unpack(">HH", head[i + 5:i + 9])
          return (w, h)
        i += 2 + struct.unpack(">H", head[i + 2:i + 4])[0]
  except struct.error:
    return None
  return None


def _high_bit_depth_to_l(im: Image.Image) -> Image.Image:
  """Modes I;16*, I and F -> L with a fixed mapping (PIL's own convert would clip at 255).

  I;16: value / 257 (65535 -> 255). I: the same when any value exceeds 255, else as is.
  F: values in [0, 1] are scaled by 255, otherwise clipped to [0, 255].
  """
  x = np.asarray(im).astype(np.float64)
  if im.mode.startswith("I;16") or (im.mode == "I" and x.size and x.max() > 255):
    x = np.clip(x, 0, 65535) / 257.0
  elif im.mode == "F" and x.size and x.min() >= 0.0 and x.max() <= 1.0:
    x = x * 255.0
  return Image.fromarray(np.clip(np.rint(x), 0, 255).astype(np.uint8), mode="L")


def to_rgb(im: Image.Image) -> Image.Image:
  """Any PIL mode -> RGB uint8; transparency is composited onto a white background."""
  if im.mode.startswith("I") or im.mode == "F":
    im = _high_bit_depth_to_l(im)
  has_alpha = "A" in im.getbands() or "a" in im.getbands() or "transparency" in im.info
  if has_alpha:
    rgba = im.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")
  if im.mode == "1":
    im = im.convert("L")
  return im.convert("RGB")


def load_image(source: ImageSource, *, max_pixels: int, name: str | None = None) -> Image.Image:
  """Decodes `source` (path, bytes, file object, PIL image or uint8 array) to an RGB PIL image.

  JPEG, PNG, WebP and GIF (first frame) and anything else PIL reads. EXIF orientation is
  applied. Every mode becomes RGB uint8; alpha (and palette transparency) is flattened onto
  WHITE, as transformers' `convert_to_rgb` does. Images with more than `max_pixels` pixels
  are refused from their header, before decoding. `name` (e.g. a record id) is used in
  error messages instead of the source's own description.

  Raises:
    ImageError: reason "missing_image", "corrupt_image", "zero_size_image" or "image_too_large".
  """
  what = _describe(source, name)
  if isinstance(source, np.ndarray):
    if source.ndim not in (2, 3) or 0 in source.shape[:2]:
      raise ImageError("zero_size_image", f"image {what}: empty array of shape {source.shape}")
    source = Image.fromarray(source)
  if isinstance(source, Image.Image):
    _check_size(source.size, max_pixels, what)
    try:
      source.load()  # a lazily opened image decodes here
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError) as e:
      raise ImageError("corrupt_image", f"image {what} cannot be decoded: {e}") from e
    return _checked(source, max_pixels, what)

  if isinstance(source, (str, os.PathLike)):
    try:
      fp = open(source, "rb")
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as e:
      raise ImageError("missing_image", f"image file {what} not found: {e.strerror}") from e
  elif isinstance(source, (bytes, bytearray, memoryview)):
    fp = io.BytesIO(bytes(source))
  elif hasattr(source, "read"):
    fp = source
  else:
    raise TypeError(f"load_image: unsupported source type {type(source).__name__} for {what}")

  try:
    start = fp.tell() if getattr(fp, "seekable", lambda: False)() else None
    try:
      im = Image.open(fp)
    except Image.DecompressionBombError as e:
      raise ImageError("image_too_large", f"image {what}: {e} (raise PIL.Image.MAX_IMAGE_PIXELS to allow it)") from e
    except UnidentifiedImageError as e:
      size = None
      if start is not None:
        fp.seek(start)
        size = _header_size(fp.read(4096))
      if size is not None and 0 in size:
        raise ImageError("zero_size_image", f"image {what} has size {size[0]}x{size[1]}") from e
      raise ImageError("corrupt_image", f"image {what} cannot be identified as an image file") from e
    with im:
      _check_size(im.size, max_pixels, what)
      try:
        im.seek(0)  # first frame of an animated GIF / WebP
        im.load()
      except Image.DecompressionBombError as e:
        raise ImageError("image_too_large", f"image {what}: {e}") from e
      except (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError) as e:
        raise ImageError("corrupt_image", f"image {what} ({im.format}) cannot be decoded: {e}") from e
      return _checked(im, max_pixels, what)
  finally:
    if isinstance(source, (str, os.PathLike)):
      fp.close()


def _check_size(size: tuple[int, int], max_pixels: int, what: str) -> None:
  w, h = size
  if w <= 0 or h <= 0:
    raise ImageError("zero_size_image", f"image {what} has size {w}x{h}")
  if w * h > max_pixels:
    raise ImageError("image_too_large", f"image {what} has {w}x{h} = {w * h} pixels, more than max_pixels={max_pixels}")


def _checked(im: Image.Image, max_pixels: int, what: str) -> Image.Image:
  """Size checks, EXIF orientation and RGB conversion of a decoded image (always a new image)."""
  _check_size(im.size, max_pixels, what)
  try:
    im = ImageOps.exif_transpose(im)
  except (SyntaxError, ValueError, OSError, struct.error, TypeError, KeyError):
    pass  # unreadable EXIF block: keep the stored orientation rather than drop the image
  try:
    return to_rgb(im)
  except ValueError as e:
    raise ImageError("corrupt_image", f"image {what}: mode {im.mode} cannot be converted to RGB: {e}") from e


def _as_pil(image: Image.Image | np.ndarray) -> Image.Image:
  if isinstance(image, np.ndarray):
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
      raise ValueError(f"expected an RGB uint8 array [H, W, 3], got {image.dtype} {image.shape}")
    return Image.fromarray(image)
  if image.mode != "RGB":
    raise ValueError(f"expected an RGB image (use load_image), got mode {image.mode}")
  return image


def _resize(image: Image.Image, size: int) -> np.ndarray:
  """PIL bicubic resize to size x size on uint8. [H, W, 3] -> [size, size, 3]."""
  return np.asarray(image.resize((size, size), resample=Image.Resampling.BICUBIC))


def _normalize(x: np.ndarray, mean: Sequence[float], std: Sequence[float], out: np.ndarray | None = None) -> np.ndarray:
  """uint8 -> float32, in transformers' order: float64 * (1/255), cast to float32, then (x - mean) / std.

  Elementwise on 256 possible values per channel, so it is a table lookup with the same bits
  as the arithmetic on the whole array (one gather when the channels share mean and std, as
  SigLIP's do: about 2x faster).
  """
  channels = len(mean)
  if x.dtype != np.uint8 or x.shape[-1] != channels:
    raise ValueError(f"expected uint8 [..., {channels}] pixels, got {x.dtype} {x.shape}")
  levels = (np.arange(256, dtype=np.float64) * (1 / 255)).astype(np.float32)[:, None]  # [256, 1]
  table = (levels - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)  # [256, C]
  if out is None:
    out = np.empty(x.shape, np.float32)
  if (table == table[:, :1]).all():
    return np.take(table[:, 0], x, out=out)
  for c in range(channels):
    out[..., c] = table[:, c][x[..., c]]
  return out


def normalize_vit(views: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
  """uint8 SigLIP views (from `preprocess_uint8`) -> the float32 model input (written into `out` if given)."""
  return _normalize(views, SIGLIP_MEAN, SIGLIP_STD, out)


def normalize_cnn(view: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
  """uint8 CNN view (from `preprocess_uint8`) -> the float32 model input (written into `out` if given)."""
  return _normalize(view, IMAGENET_MEAN, IMAGENET_STD, out)


def _vit_views_uint8(image: Image.Image, image_size: int, zoom: bool) -> np.ndarray:
  s = image_size
  views = [_resize(image, s)]
  if zoom:
    big = _resize(image, 2 * s)  # [2S, 2S, 3]
    views += [big[:s, :s], big[:s, s:], big[s:, :s], big[s:, s:]]
  return np.stack(views)  # [V, S, S, 3] uint8


def vit_views(image: Image.Image | np.ndarray, *, image_size: int, zoom: bool,
              mean: Sequence[float] = SIGLIP_MEAN, std: Sequence[float] = SIGLIP_STD) -> np.ndarray:
  """SigLIP inputs: the global view, then (zoom) the 2x resize cut into tiles TL, TR, BL, BR.

  Returns float32 [V, image_size, image_size, 3], V = 5 with zoom, else 1.
  """
  return _normalize(_vit_views_uint8(_as_pil(image), image_size, zoom), mean, std)


def cnn_view(image: Image.Image | np.ndarray, *, image_size: int,
             mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> np.ndarray:
  """ConvNeXt input: bicubic resize to image_size x image_size, ImageNet normalisation. -> float32 [S, S, 3]."""
  return _normalize(_resize(_as_pil(image), image_size), mean, std)


def preprocess_uint8(image: Image.Image | np.ndarray, cfg: TinyVLMConfig) -> dict[str, np.ndarray]:
  """`preprocess` before normalisation: uint8 views, a quarter of the bytes (what data workers send).

  `normalize_vit` / `normalize_cnn` of these equal `preprocess` bit for bit.
  """
  image = _as_pil(image)
  return {
      "pixel_values": _vit_views_uint8(image, cfg.vision.image_size, cfg.zoom),
      "cnn_pixel_values": _resize(image, cfg.cnn.image_size),
  }


def preprocess(image: Image.Image | np.ndarray, cfg: TinyVLMConfig) -> dict[str, np.ndarray]:
  """One RGB image -> {"pixel_values": [V, S, S, 3], "cnn_pixel_values": [C, C, 3]} float32 for the model `cfg`."""
  raw = preprocess_uint8(image, cfg)
  return {"pixel_values": normalize_vit(raw["pixel_values"]), "cnn_pixel_values": normalize_cnn(raw["cnn_pixel_values"])}
