"""Stage 1, pre-training (paper Table 8): only the ConvPooler and the connector learn.

16K steps, LR 1e-5 -> 5e-6 linear, global batch 64, next-token loss on the caption alone,
ALLaVA-Caption-LAION-4V + ShareGPT4V-PT's LLaVA-Pretrain part (1.03 M captions). The CNN
and fuser do not exist yet. Starts from the converted backbones:

  python convert/hf_to_jax.py ... --out /ckpt/tinyvlm_init
  python launch/train.py --config configs/stage1.py --workdir /ckpt/run \
    --config.init.params=/ckpt/tinyvlm_init \
    --config.data.sources.allava_laion.path=/data/allava_laion/ALLaVA-Caption-LAION-4V.json \
    --config.data.sources.allava_laion.image_root=/data/allava_laion \
    --config.data.sources.sharegpt4v_pt.path=/data/sharegpt4v/share-captioner_coco_lcs_sam_1246k_1107.json \
    --config.data.sources.sharegpt4v_pt.image_root=/data/sharegpt4v
"""

import ml_collections

from tinyvlm_jax.presets import get_preset
from tinyvlm_jax.train.config import stage_config


def get_config() -> ml_collections.ConfigDict:
  c = stage_config()
  c.stage = "stage1"
  c.model = get_preset("tinyvlm_0p6b")
  c.model.use_cnn = False                      # the CNN branch arrives in stage 3

  c.init.params = ""                           # required: the converted backbones' model folder

  c.trainable = ("pooler", "connector")        # vision encoder and LLM frozen
  c.total_steps = 16_000
  c.schedule.kind = "linear"
  c.schedule.lr_max = 1e-5
  c.schedule.lr_min = 5e-6
  c.global_batch_size = 64

  c.data.caption_only = True                   # the caption alone carries the loss
  c.data.max_len = 2048
  c.data.sources = ml_collections.ConfigDict({
      "allava_laion": dict(kind="llava_json", path="/data/allava_laion/ALLaVA-Caption-LAION-4V.json",
                           image_root="/data/allava_laion", weight=1.0),
      "sharegpt4v_pt": dict(kind="llava_json", path="/data/sharegpt4v/sharegpt4v_pt_llava_pretrain.json",
                            image_root="/data/sharegpt4v", weight=1.0),
  })
  c.loss.neftune_alpha = 0.0
  return c
