"""TinyVLM in JAX/Flax: SigLIP + ConvPooler + MLP connector + Qwen2.5, with an optional ConvNeXt-V2 branch."""

__version__ = "0.1.0"
