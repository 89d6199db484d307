"""Input pipeline: files -> checked examples -> token ids, loss masks and pixel arrays.

images: decoding and the SigLIP / CNN views; tokenizer: Qwen2.5 BPE; chat: ChatML encoding
with the loss mask; synthetic: a procedural VQA set for the CPU demo and tests.
"""
