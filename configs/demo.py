"""The CPU demo: TinyVLM's architecture at small widths (preset "demo") learns the synthetic
shapes/colours/counts/positions/words VQA set, through the paper's three stages, in one command:

  python launch/train.py                     # = --config configs/demo.py --workdir ./workdir/demo

The data (tinyvlm_jax.data.synthetic) is generated into WORKDIR/data when absent. Then
stage 1 trains the pooler + connector on captions, stage 2 the vision tower, pooler,
connector and LLM on the questions (answer-only loss, NEFTune), stage 3 adds the ConvNeXt
branch and a fresh fuser and trains everything; finally the held-out test split is
answered greedily and WORKDIR/demo_results.json holds the exact-match accuracy.

No pretrained weights exist offline (a real run starts from the converted SigLIP / Qwen2.5 /
ConvNeXt-V2, configs/stage1.py). In place of SigLIP's pretraining, the vision tower first learns
the words of the train images' captions (caption-tag pretraining, tinyvlm_jax.train.vision_pretrain,
`demo.vision_pretrain`), and stage 1 starts from it; the LLM and stage 3's CNN start random.
The stages keep Table 8's pattern (what trains, schedule shapes, loss, NEFTune); steps, LRs,
batch and sequence length are the demo's own, sized for a 2-core CPU in float32. Any field can
be overridden, e.g. --config.stages.stage2.total_steps=100.
"""

import ml_collections

from tinyvlm_jax.presets import get_preset
from tinyvlm_jax.train.config import stage_config


# NEFTune's noise is alpha / sqrt(L * d) per element: with the demo's L ~ 110 and d = 64 that is
# 0.012 at alpha 1, a tenth of the embeddings' initial scale (std 0.125, below).
NEFTUNE_ALPHA = 1.0


def _model(use_cnn: bool) -> ml_collections.ConfigDict:
  m = get_preset("demo")
  m.use_cnn = use_cnn
  m.vision.hidden_size = 64                   # narrower than the preset's 96
  m.vision.intermediate_size = 128
  # A 64-wide Qwen2 (4 heads of 16, 2 KV heads): the 151,936-row embedding, tied with the LM
  # head, is most of the model, and its AdamW update and head matmuls scale with this width.
  m.llm.hidden_size = 64
  m.llm.intermediate_size = 128
  # Qwen2's init std of 0.02 gives each weight matrix of the 896-wide model a gain of
  # 0.02 * sqrt(896) = 0.6, but only 0.16 at width 64: the chain of ~4 matrices between a visual
  # token and the answer logit then starts (0.16 / 0.6)^4, about 200x, weaker than in the real
  # model. The whole model trained on shape questions alone (global view, larger shapes, 400 steps)
  # reached 0.44 held-out with std 0.02 and 0.82 with 1 / sqrt(64).
  m.llm.initializer_range = m.llm.hidden_size ** -0.5
  return m


def _stage(name: str, *, use_cnn: bool) -> ml_collections.ConfigDict:
  c = stage_config()
  c.stage = name
  c.model = _model(use_cnn)
  c.compute_dtype = "float32"                 # fp32 on CPU (DESIGN 4)
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  c.global_batch_size = 16
  c.checkpoint = ml_collections.ConfigDict(dict(every_steps=200, keep=2, use_async=True))
  c.data.sources = ml_collections.ConfigDict({
      "synthetic_vqa": dict(kind="llava_json", path="{workdir}/data/train.json", image_root="", weight=1.0)})
  c.data.max_len = 128
  c.data.seed = 0
  c.loss.max_targets = 6                      # up to 3 one-word answers + <|im_end|> each: the LM head runs on these only
  c.log_every = 10
  return c


def get_config() -> ml_collections.ConfigDict:
  s1 = _stage("stage1", use_cnn=False)
  s1.init.params = "{workdir}/vision_pretrain"  # the caption-tag pretrained tower (see above)
  s1.trainable = ("pooler", "connector")
  s1.total_steps = 30
  s1.global_batch_size = 8
  s1.schedule = ml_collections.ConfigDict(dict(kind="linear", lr_max=3e-4, lr_min=1.5e-4, warmup_steps=0))
  s1.data.sources = ml_collections.ConfigDict({
      "synthetic_captions": dict(kind="llava_json", path="{workdir}/data/captions.json", image_root="", weight=1.0)})
  s1.data.caption_only = True
  s1.data.max_len = 144
  s1.loss.max_targets = 24                    # captions: at most ~20 tokens + <|im_end|>

  s2 = _stage("stage2", use_cnn=False)
  s2.init.params = "previous"
  s2.trainable = ("vision", "pooler", "connector", "llm")
  s2.total_steps = 500
  # One LR for everything, with a warm-up. Measured on stage 2 alone (600 steps from random weights):
  # lr 1e-3 for all modules reached 0.63 (colour and position 1.0); lr 3e-3 with the vision path at
  # 1x dropped to 0.44 (colour 0.59), and at 0.1x of 3e-3 the vision path learnt too slowly.
  s2.schedule = ml_collections.ConfigDict(dict(kind="linear", lr_max=1e-3, lr_min=0.0, warmup_steps=50))
  s2.loss.neftune_alpha = NEFTUNE_ALPHA

  s3 = _stage("stage3", use_cnn=True)
  s3.init.params = "previous"
  s3.init.cnn = "random"                      # no pretrained ConvNeXt offline
  s3.init.fresh = ("fuser",)
  s3.trainable = ("vision", "pooler", "connector", "llm", "cnn", "fuser")
  s3.total_steps = 30                         # enough to show the CNN and fuser train; each step costs 1.3x stage 2's
  s3.schedule = ml_collections.ConfigDict(dict(kind="constant", lr_max=3e-4, lr_min=3e-4, warmup_steps=0))
  for module in ("vision", "pooler", "connector"):
    s3.lr_mults[module] = 0.1
  s3.lr_mults.cnn = 10.0                      # the fresh parts learn faster than the trained ones
  s3.lr_mults.fuser = 10.0
  s3.loss.neftune_alpha = NEFTUNE_ALPHA

  c = ml_collections.ConfigDict()
  c.stages = ml_collections.ConfigDict({"stage1": s1, "stage2": s2, "stage3": s3})
  c.stage_order = ("stage1", "stage2", "stage3")
  c.demo = ml_collections.ConfigDict(dict(
      data_dir="{workdir}/data", num_train=4000, num_test=500, image_size=64, seed=0,
      max_new_tokens=6, eval_batch_size=100))
  # Caption-tag pretraining of the tower, into WORKDIR/vision_pretrain (stage 1's init.params): the
  # global view only, as SigLIP is pretrained on whole images (5x cheaper than all 5 views; measured
  # after 1000 steps in 90 s: held-out tag F1 0.95, against 0.94 for 600 steps of all views in 261 s).
  c.demo.vision_pretrain = ml_collections.ConfigDict(dict(
      steps=1000, batch_size=32, lr=1e-3, warmup_steps=50, clip_norm=1.0, seed=0, global_view_only=True))
  return c
