"""Stage 2, instruction fine-tuning (paper Table 8): vision encoder, pooler, connector and LLM learn.

169K steps, LR 1e-6 -> 0 linear, global batch 16, loss on the answer tokens only,
NEFTune noise on the LLM's input embeddings; The Cauldron, LNQA, Docmatix and
ShareGPT-4o (2.7 M), plus a text-only OpenHermes-2.5 batch every 25 steps and a
MathInstruct batch every 100. Starts from stage 1's workdir (its final model folder):

  python launch/train.py --config configs/stage2.py --workdir /ckpt/run \
    --config.init.params=/ckpt/run/stage1 \
    --config.data.sources.cauldron.path='/data/the_cauldron/*/train-*.parquet' ...
"""

import ml_collections

from tinyvlm_jax.presets import get_preset
from tinyvlm_jax.train.config import stage_config


def get_config() -> ml_collections.ConfigDict:
  c = stage_config()
  c.stage = "stage2"
  c.model = get_preset("tinyvlm_0p6b")
  c.model.use_cnn = False

  c.init.params = ""                           # required: stage 1's workdir or its model folder

  c.trainable = ("vision", "pooler", "connector", "llm")
  c.total_steps = 169_000
  c.schedule.kind = "linear"
  c.schedule.lr_max = 1e-6
  c.schedule.lr_min = 0.0
  c.global_batch_size = 16

  c.data.caption_only = False                  # the pipeline supervises the assistant turns only
  c.data.max_len = 2048
  c.data.sources = ml_collections.ConfigDict({
      "cauldron": dict(kind="cauldron_parquet", path="/data/the_cauldron/*/train-*.parquet", image_root="",
                       weight=1.0),
      "lnqa": dict(kind="lnqa_parquet", path="/data/lnqa/data/train-*.parquet", image_root="", weight=1.0),
      "docmatix": dict(kind="cauldron_parquet", path="/data/docmatix/data/train-*.parquet", image_root="",
                       weight=1.0),
      "sharegpt4o": dict(kind="llava_json", path="/data/sharegpt4o/image_conversations/gpt-4o.json",
                         image_root="/data/sharegpt4o/images", weight=1.0),
  })
  c.data.text_source = ml_collections.ConfigDict(dict(kind="sharegpt_text", path="/data/openhermes/openhermes2_5.json"))
  c.data.math_source = ml_collections.ConfigDict(dict(kind="mathinstruct", path="/data/mathinstruct/MathInstruct.json"))
  c.data.text_every = 25
  c.data.math_every = 100
  c.loss.neftune_alpha = 5.0                   # (choice) NEFTune's default alpha
  return c
