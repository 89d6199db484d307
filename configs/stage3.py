"""Stage 3, CNN-augmented fine-tuning (paper Table 8): everything learns, CNN and fuser included.

25K steps, LR 5e-7 constant, global batch 16, answer-only loss with NEFTune, on a 400 K
subset of stage 2's data. Starts from stage 2's workdir; the ConvNeXt-V2 comes from its
own pretrained weights (a model folder holding `cnn`, e.g. the one hf_to_jax.py wrote for
stage 1) and the cross-attention fuser is initialised fresh:

  python launch/train.py --config configs/stage3.py --workdir /ckpt/run \
    --config.init.params=/ckpt/run/stage2 --config.init.cnn=/ckpt/tinyvlm_init ...

A fresh fuser at 5e-7 learns slowly (DESIGN 2): --config.lr_mults.fuser=100 raises only its LR.
"""

import ml_collections

from tinyvlm_jax.presets import get_preset
from tinyvlm_jax.train.config import stage_config


def get_config() -> ml_collections.ConfigDict:
  c = stage_config()
  c.stage = "stage3"
  c.model = get_preset("tinyvlm_0p6b")
  c.model.use_cnn = True                       # ConvNeXt-V2-Tiny + CrossAttentionFuser

  c.init.params = ""                           # required: stage 2's workdir or its model folder
  c.init.cnn = ""                              # required: a model folder holding the pretrained CNN
  c.init.fresh = ("fuser",)

  c.trainable = ("vision", "pooler", "connector", "llm", "cnn", "fuser")
  c.total_steps = 25_000
  c.schedule.kind = "constant"
  c.schedule.lr_max = 5e-7
  c.schedule.lr_min = 5e-7
  c.global_batch_size = 16

  c.data.caption_only = False
  c.data.max_len = 2048
  c.data.subset = 400_000                      # a fixed random 400 K subset of stage 2's sources
  c.data.sources = ml_collections.ConfigDict({
      "cauldron": dict(kind="cauldron_parquet", path="/data/the_cauldron/*/train-*.parquet", image_root="",
                       weight=1.0),
      "lnqa": dict(kind="lnqa_parquet", path="/data/lnqa/data/train-*.parquet", image_root="", weight=1.0),
      "docmatix": dict(kind="cauldron_parquet", path="/data/docmatix/data/train-*.parquet", image_root="",
                       weight=1.0),
      "sharegpt4o": dict(kind="llava_json", path="/data/sharegpt4o/image_conversations/gpt-4o.json",
                         image_root="/data/sharegpt4o/images", weight=1.0),
  })
  c.loss.neftune_alpha = 5.0
  return c
