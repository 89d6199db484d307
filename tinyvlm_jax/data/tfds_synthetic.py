"""The synthetic VQA set as a TFDS dataset (`tinyvlm_synthetic`), stored as array_record.

TensorFlow is not installed, so the builder yields images ENCODED (PNG bytes in a file
object): tfds can store those without TensorFlow, not numpy arrays. Reading goes through
`tfds.data_source`, a random-access source grain can use directly:

  prepare(data_dir, config="tiny")                      # writes data_dir/tinyvlm_synthetic/tiny/1.0.0
  ds = data_source(data_dir, "train", config="tiny")   # image left as PNG bytes
  records = readers.TfdsSource(ds, name="synthetic")
"""

from __future__ import annotations

import io
import os

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from tinyvlm_jax.data import synthetic

NAME = "tinyvlm_synthetic"


class SyntheticConfig(tfds.core.BuilderConfig):
  """How many examples per split, their seed and image side."""

  def __init__(self, *, num_train: int, num_test: int, image_size: int = 64, seed: int = 0, **kwargs):
    super().__init__(**kwargs)
    self.num_train = num_train
    self.num_test = num_test
    self.image_size = image_size
    self.seed = seed


def _png(image: np.ndarray) -> io.BytesIO:
  """uint8 [H, W, 3] -> PNG bytes in a file object (what tfds' Image feature encodes without TF)."""
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="PNG")
  buf.seek(0)
  return buf


class TinyvlmSynthetic(tfds.core.GeneratorBasedBuilder):
  """Procedural shapes-and-colours VQA (see `synthetic.generate_split`) for the demo and tests."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  BUILDER_CONFIGS = [
      SyntheticConfig(name="default", description="demo size", num_train=4096, num_test=512, image_size=64),
      SyntheticConfig(name="tiny", description="test size", num_train=32, num_test=8, image_size=32),
  ]
  DEFAULT_CONFIG_NAME = "default"
  # tfds finds the builder's source file (for a checksums file next to it) through the
  # `importlib_resources` backport, which is not installed; nothing is downloaded, so none is needed.
  code_path = None

  def __init__(self, **kwargs):
    kwargs.setdefault("file_format", "array_record")
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="Synthetic visual questions about coloured shapes, with captions.",
        features=tfds.features.FeaturesDict({
            "id": tfds.features.Text(),
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
            "question": tfds.features.Text(),
            "answer": tfds.features.Text(),
            "type": tfds.features.Text(),
            "caption": tfds.features.Text(),
        }),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download: generated from the seed
    cfg = self.builder_config
    return {"train": self._generate_examples("train", cfg.num_train),
            "test": self._generate_examples("test", cfg.num_test)}

  def _generate_examples(self, split: str, n: int):
    cfg = self.builder_config
    for ex in synthetic.generate_split(split, n, cfg.seed, image_size=cfg.image_size):
      yield ex["id"], {
          "id": ex["id"], "image": _png(ex["image"]), "question": ex["question"],
          "answer": ex["answer"], "type": ex["type"], "caption": ex["caption"],
      }


def prepare(data_dir: str | os.PathLike, config: str = "default") -> TinyvlmSynthetic:
  """Generates and writes the dataset under `data_dir` (a no-op when it is already there)."""
  builder = TinyvlmSynthetic(config=config, data_dir=os.fspath(data_dir))
  builder.download_and_prepare()
  return builder


def data_source(data_dir: str | os.PathLike, split: str, config: str = "default", *, decode_image: bool = False):
  """`tfds.data_source` of a prepared split; the image stays PNG bytes unless `decode_image`."""
  decoders = None if decode_image else {"image": tfds.decode.SkipDecoding()}
  return tfds.data_source(f"{NAME}/{config}", split=split, data_dir=os.fspath(data_dir),
                          download=False, decoders=decoders)
