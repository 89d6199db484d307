"""Image loading and the SigLIP / CNN views against transformers' PIL image processor."""

import dataclasses
import io
import os
import struct
import zlib

import numpy as np
import pytest
import skimage
from PIL import Image
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from tinyvlm_jax.data import images
from tinyvlm_jax.data.images import ImageError, cnn_view, load_image, preprocess, vit_views
from tinyvlm_jax.presets import IMAGENET_MEAN, IMAGENET_STD, model_config

SKIMAGE_DATA = os.path.join(os.path.dirname(skimage.__file__), "data")
PHOTOS = ["astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "camera.png", "logo.png"]
MAX_PIXELS = images.DEFAULT_MAX_PIXELS


def _hf(image, size, **kw):
  """transformers' PIL SigLIP processor at size x size -> [H, W, 3] float32."""
  proc = SiglipImageProcessorPil(size={"height": size, "width": size}, **kw)
  return np.asarray(proc(image, return_tensors="np")["pixel_values"][0]).transpose(1, 2, 0)


def _png(w, h):
  """A PNG with the given header size and no pixel data (PIL cannot write zero sizes)."""
  def chunk(tag, data):
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
  ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
  return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def _encode(im, fmt, **kw):
  buf = io.BytesIO()
  im.save(buf, fmt, **kw)
  return buf.getvalue()


@pytest.mark.parametrize("name", PHOTOS)
def test_views_match_transformers_siglip_processor(name):
  path = os.path.join(SKIMAGE_DATA, name)
  image = load_image(path, max_pixels=MAX_PIXELS)
  views = vit_views(image, image_size=384, zoom=True)
  assert views.shape == (5, 384, 384, 3) and views.dtype == np.float32
  # The raw file through transformers (which converts to RGB itself, alpha onto white too).
  glob = _hf(Image.open(path), 384)
  assert np.abs(views[0] - glob).max() <= 1e-5
  big = _hf(Image.open(path), 768)
  for k, (r, c) in enumerate([(0, 0), (0, 384), (384, 0), (384, 384)]):  # TL, TR, BL, BR
    assert np.abs(views[1 + k] - big[r:r + 384, c:c + 384]).max() <= 1e-5, f"tile {k}"
  assert views.min() >= -1.0 and views.max() <= 1.0
  single = vit_views(image, image_size=384, zoom=False)
  assert single.shape == (1, 384, 384, 3)
  np.testing.assert_array_equal(single[0], views[0])


def test_cnn_view_and_preprocess_follow_config():
  image = load_image(os.path.join(SKIMAGE_DATA, "chelsea.png"), max_pixels=MAX_PIXELS)
  cfg = model_config("tinyvlm_0p6b")
  out = preprocess(image, cfg)
  s, c = cfg.vision.image_size, cfg.cnn.image_size
  assert out["pixel_values"].shape == (cfg.num_views, s, s, 3)
  assert out["cnn_pixel_values"].shape == (c, c, 3)
  ref = _hf(image, c, image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD))
  assert np.abs(out["cnn_pixel_values"] - ref).max() <= 1e-5
  np.testing.assert_array_equal(out["cnn_pixel_values"], cnn_view(image, image_size=c))
  no_zoom = preprocess(image, dataclasses.replace(cfg, zoom=False))
  assert no_zoom["pixel_values"].shape == (1, s, s, 3)
  # uint8 arrays are accepted as well as PIL images
  np.testing.assert_array_equal(vit_views(np.asarray(image), image_size=32, zoom=True),
                                vit_views(image, image_size=32, zoom=True))


def test_sources_path_bytes_fileobj_agree(tmp_path):
  path = os.path.join(SKIMAGE_DATA, "rocket.jpg")
  ref = np.asarray(load_image(path, max_pixels=MAX_PIXELS))
  data = open(path, "rb").read()
  np.testing.assert_array_equal(np.asarray(load_image(data, max_pixels=MAX_PIXELS)), ref)
  with open(path, "rb") as f:
    np.testing.assert_array_equal(np.asarray(load_image(f, max_pixels=MAX_PIXELS)), ref)
  np.testing.assert_array_equal(np.asarray(load_image(Image.open(path), max_pixels=MAX_PIXELS)), ref)
  assert ref.shape == (427, 640, 3) and ref.dtype == np.uint8


def test_every_mode_converts_to_rgb_uint8():
  grey = np.asarray(Image.open(os.path.join(SKIMAGE_DATA, "camera.png")))[:64, :96]  # [64, 96] uint8
  rgb = np.asarray(load_image(os.path.join(SKIMAGE_DATA, "astronaut.png"), max_pixels=MAX_PIXELS))[:64, :96]
  alpha = np.zeros(grey.shape, np.uint8)
  alpha[:, 48:] = 255  # left half transparent, right half opaque

  def load(src):
    out = load_image(src, max_pixels=MAX_PIXELS)
    assert out.mode == "RGB" and out.size == (96, 64)
    arr = np.asarray(out)
    assert arr.dtype == np.uint8 and arr.shape == (64, 96, 3)
    return arr

  expect_grey = np.repeat(grey[..., None], 3, -1)
  np.testing.assert_array_equal(load(_encode(Image.fromarray(grey), "PNG")), expect_grey)
  np.testing.assert_array_equal(load(_encode(Image.fromarray(grey.astype(np.uint16) * 257), "PNG")),
                                expect_grey)
  np.testing.assert_array_equal(load(Image.fromarray(grey.astype(np.int32) * 257)), expect_grey)
  np.testing.assert_array_equal(load(_encode(Image.fromarray(grey.astype(np.float32) / 255), "TIFF")),
                                expect_grey)
  bw = load(_encode(Image.fromarray(grey > 128).convert("1"), "PNG"))
  np.testing.assert_array_equal(bw, np.where(grey[..., None] > 128, 255, 0).repeat(3, -1))

  white = np.full((64, 48, 3), 255, np.uint8)
  la = load(_encode(Image.merge("LA", [Image.fromarray(grey), Image.fromarray(alpha)]), "PNG"))
  np.testing.assert_array_equal(la[:, :48], white)
  np.testing.assert_array_equal(la[:, 48:], expect_grey[:, 48:])
  rgba = np.concatenate([rgb, alpha[..., None]], -1)
  for fmt, kw in [("PNG", {}), ("WEBP", {"lossless": True})]:
    out = load(_encode(Image.fromarray(rgba), fmt, **kw))
    np.testing.assert_array_equal(out[:, :48], white)
    np.testing.assert_array_equal(out[:, 48:], rgb[:, 48:])

  pal = Image.fromarray(rgb).quantize(16)
  p = load(_encode(pal, "PNG"))
  np.testing.assert_array_equal(p, np.asarray(pal.convert("RGB")))
  pa = pal.copy()
  pa.info["transparency"] = int(np.asarray(pal)[0, 0])  # palette index of the top-left pixel is transparent
  out = load(_encode(pa, "PNG", transparency=pa.info["transparency"]))
  np.testing.assert_array_equal(out[0, 0], [255, 255, 255])
  pa_mode = load(Image.fromarray(rgba).convert("PA"))
  np.testing.assert_array_equal(pa_mode[:, :48], white)

  cmyk = Image.fromarray(rgb).convert("CMYK")
  np.testing.assert_array_equal(load(_encode(cmyk, "TIFF")), np.asarray(cmyk.convert("RGB")))
  assert np.abs(load(_encode(cmyk, "JPEG", quality=95)).astype(int) - rgb).mean() < 8

  # the real RGBA logo (opaque alpha): the colour channels pass through unchanged
  logo_raw = np.asarray(Image.open(os.path.join(SKIMAGE_DATA, "logo.png")))
  assert logo_raw.shape[-1] == 4
  logo = np.asarray(load_image(os.path.join(SKIMAGE_DATA, "logo.png"), max_pixels=MAX_PIXELS))
  np.testing.assert_array_equal(logo, logo_raw[..., :3])


def test_gif_first_frame():
  frames = [Image.new("RGB", (16, 8), c) for c in [(255, 0, 0), (0, 0, 255)]]
  data = _encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
  assert Image.open(io.BytesIO(data)).n_frames == 2
  out = np.asarray(load_image(data, max_pixels=MAX_PIXELS))
  assert out.shape == (8, 16, 3)
  np.testing.assert_array_equal(out, np.broadcast_to([255, 0, 0], out.shape))
  gif = load_image(os.path.join(SKIMAGE_DATA, "no_time_for_that_tiny.gif"), max_pixels=MAX_PIXELS)
  np.testing.assert_array_equal(np.asarray(gif),
                                np.asarray(Image.open(os.path.join(SKIMAGE_DATA, "no_time_for_that_tiny.gif"))
                                           .convert("RGB")))


@pytest.mark.parametrize("orientation,red_at", [(1, "left"), (3, "right"), (6, "top"), (8, "bottom")])
def test_exif_orientation_applied(orientation, red_at):
  arr = np.zeros((20, 40, 3), np.uint8)
  arr[:, :20] = (255, 0, 0)  # left half red
  arr[:, 20:] = (0, 0, 255)  # right half blue
  exif = Image.Exif()
  exif[0x0112] = orientation
  out = np.asarray(load_image(_encode(Image.fromarray(arr), "JPEG", quality=95, exif=exif), max_pixels=MAX_PIXELS))
  assert out.shape == ((20, 40, 3) if orientation in (1, 3) else (40, 20, 3))
  h, w = out.shape[:2]
  half = {"left": out[:, :w // 2], "right": out[:, w // 2:], "top": out[:h // 2], "bottom": out[h // 2:]}[red_at]
  assert half[..., 0].mean() > 200 and half[..., 2].mean() < 50


def test_errors_name_the_source_and_reason(tmp_path, monkeypatch):
  def reason(src, max_pixels=MAX_PIXELS, name=None):
    with pytest.raises(ImageError) as e:
      load_image(src, max_pixels=max_pixels, name=name)
    return e.value.reason, str(e.value)

  missing = str(tmp_path / "nope.png")
  r, msg = reason(missing)
  assert r == "missing_image" and missing in msg
  assert reason(str(tmp_path))[0] == "missing_image"  # a directory
  assert reason(b"definitely not an image")[0] == "corrupt_image"
  assert reason(b"")[0] == "corrupt_image"
  png = open(os.path.join(SKIMAGE_DATA, "coffee.png"), "rb").read()
  assert reason(Image.open(io.BytesIO(png[:len(png) // 2])))[0] == "corrupt_image"  # lazily opened, truncated
  bad = tmp_path / "truncated.png"
  bad.write_bytes(png[:len(png) // 2])
  r, msg = reason(str(bad))
  assert r == "corrupt_image" and "truncated.png" in msg
  r, msg = reason(b"garbage", name="record 17 of shard-00003.parquet")
  assert r == "corrupt_image" and "record 17 of shard-00003.parquet" in msg

  assert reason(_png(0, 5))[0] == "zero_size_image"
  assert reason(_png(7, 0))[0] == "zero_size_image"
  jpg = bytearray(_encode(Image.new("RGB", (4, 4)), "JPEG"))
  sof = jpg.find(b"\xff\xc0")
  jpg[sof + 5:sof + 7] = b"\x00\x00"  # height 0
  assert reason(bytes(jpg))[0] == "zero_size_image"
  assert reason(Image.new("RGB", (0, 3)))[0] == "zero_size_image"
  assert reason(np.zeros((0, 4, 3), np.uint8))[0] == "zero_size_image"

  r, msg = reason(png, max_pixels=600 * 400 - 1)
  assert r == "image_too_large" and "600x400" in msg
  assert load_image(png, max_pixels=600 * 400).size == (600, 400)
  # PIL's own guard (above 2 x MAX_IMAGE_PIXELS) maps to the same reason
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
  assert reason(png)[0] == "image_too_large"


def test_uint8_views_normalise_to_preprocess_bit_for_bit():
  """Data workers send uint8 views; the table lookup in normalize_* gives preprocess's exact bits."""
  image = load_image(os.path.join(SKIMAGE_DATA, "coffee.png"), max_pixels=MAX_PIXELS)
  cfg = model_config("tinyvlm_0p6b")
  raw = images.preprocess_uint8(image, cfg)
  assert raw["pixel_values"].dtype == np.uint8 and raw["cnn_pixel_values"].dtype == np.uint8
  out = preprocess(image, cfg)
  np.testing.assert_array_equal(images.normalize_vit(raw["pixel_values"]), out["pixel_values"])
  np.testing.assert_array_equal(images.normalize_cnn(raw["cnn_pixel_values"]), out["cnn_pixel_values"])
  # the table equals transformers' arithmetic on every value: float64 * (1/255) -> float32, then (x - mean) / std
  levels = np.arange(256, dtype=np.uint8)[:, None].repeat(3, axis=1)
  direct = ((levels.astype(np.float64) * (1 / 255)).astype(np.float32) - np.float32(0.5)) / np.float32(0.5)
  np.testing.assert_array_equal(images.normalize_vit(levels), direct)
  with pytest.raises(ValueError, match="uint8"):
    images.normalize_vit(levels.astype(np.float32))
