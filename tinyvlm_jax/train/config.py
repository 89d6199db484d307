"""The training config: every field a stage file (configs/stageN.py) sets or the CLI overrides.

`stage_config()` returns an `ml_collections.ConfigDict` with all fields and neutral
defaults; configs/stage1.py, stage2.py, stage3.py and demo.py fill in the paper's values.
"""

from __future__ import annotations

import ml_collections

from tinyvlm_jax.presets import get_preset

# Parameter path regex -> one mesh axis (or None) per dimension; first full match wins.
# "fsdp": shard the largest evenly divisible dimension over `fsdp`. Kernels are [in, out].
# The vocabulary dimension is never split over `tensor`: with it split, XLA's SPMD
# partitioner (jax 0.10.2, CPU) gave wrong, run-to-run varying gradients through the
# softmax cross-entropy; the hidden dimension goes over `fsdp` instead.
DEFAULT_PARTITION_RULES = (
    (r"llm/embed_tokens/embedding", (None, "fsdp")),                              # [V, D]
    (r"llm/lm_head/kernel", ("fsdp", None)),                                      # [D, V]
    (r"llm/layers_\d+/(self_attn/(q|k|v)_proj|mlp/(gate|up)_proj)/kernel", ("fsdp", "tensor")),
    (r"llm/layers_\d+/self_attn/(q|k|v)_proj/bias", ("tensor",)),
    (r"llm/layers_\d+/(self_attn/o_proj|mlp/down_proj)/kernel", ("tensor", "fsdp")),
    (r"vision/encoder/layers_\d+/(self_attn/(q|k|v)_proj|mlp/fc1)/kernel", ("fsdp", "tensor")),
    (r"vision/encoder/layers_\d+/(self_attn/(q|k|v)_proj|mlp/fc1)/bias", ("tensor",)),
    (r"vision/encoder/layers_\d+/(self_attn/out_proj|mlp/fc2)/kernel", ("tensor", "fsdp")),
    (r"connector/fc\d/kernel", ("fsdp", "tensor")),
    (r".*", "fsdp"),
)


MODULES = ("vision", "pooler", "connector", "llm", "cnn", "fuser")


def stage_config() -> ml_collections.ConfigDict:
  """All fields of one training stage, with neutral defaults."""
  c = ml_collections.ConfigDict()
  c.stage = "stage"                     # name: the stage's folder under the workdir
  c.model = get_preset("tinyvlm_0p6b")
  c.compute_dtype = "auto"              # auto: bfloat16 on TPU/GPU, float32 on CPU
  c.remat = "none"                      # none | full | dots (each Qwen2 decoder layer)
  c.seed = 0

  # Where the parameters come from: a model folder (convert/hf_to_jax.py, model_io.save_model),
  # a training workdir (its latest checkpoint), or "random" (no pretrained weights).
  c.init = ml_collections.ConfigDict()
  c.init.params = "random"
  c.init.cnn = ""                       # stage 3: model folder holding the pretrained CNN ("" = from init.params)
  c.init.fresh = ()                     # modules initialised fresh whatever init.params holds (stage 3: fuser)

  c.trainable = ("pooler", "connector")
  c.frozen = ()                         # regexes of parameter paths kept fixed inside trainable modules
  # Multiplier on the stage's LR per module (a module absent from the model is ignored at 1.0).
  c.lr_mults = ml_collections.ConfigDict({m: 1.0 for m in MODULES})
  # Steps over which a module's LR ramps up from 0 (on top of the schedule); 0: none.
  c.lr_warmup = ml_collections.ConfigDict({m: 0 for m in MODULES})
  c.total_steps = 1000
  c.global_batch_size = 16              # over all hosts and micro-batches
  c.grad_accum_steps = 1
  c.schedule = ml_collections.ConfigDict(dict(kind="linear", lr_max=1e-5, lr_min=0.0, warmup_steps=0))
  c.optim = ml_collections.ConfigDict(dict(b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, clip_norm=1.0))
  c.loss = ml_collections.ConfigDict(dict(neftune_alpha=0.0, max_targets=0))

  c.data = ml_collections.ConfigDict()
  c.data.sources = ml_collections.ConfigDict()   # {name: {kind, path, image_root, weight}}
  c.data.text_source = ml_collections.ConfigDict(dict(kind="", path=""))   # OpenHermes (stage 2)
  c.data.math_source = ml_collections.ConfigDict(dict(kind="", path=""))   # MathInstruct (stage 2)
  c.data.max_len = 2048
  c.data.caption_only = False           # stage 1: the caption alone carries the loss
  c.data.text_every = 0                 # a text-only batch every N steps (0: never)
  c.data.math_every = 0
  c.data.worker_count = 0
  c.data.max_bad_fraction = 0.01
  c.data.seed = 0
  c.data.tokenizer_path = ""            # "": the offline Qwen2.5 tokenizer
  c.data.subset = 0                     # > 0: a fixed random subset of this many records of the sources

  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  c.partition_rules = DEFAULT_PARTITION_RULES
  c.fsdp_min_elements = 2 ** 14         # smaller arrays stay replicated under the "fsdp" rule

  c.checkpoint = ml_collections.ConfigDict(dict(every_steps=1000, keep=3, use_async=True))
  c.log_every = 10
  c.peak_flops_per_device = 0.0         # 0: look the device up (CPU: measured once)
  return c
