"""Evaluation: benchmark readers, prompts and metrics following lmms-eval v0.2.4 (EVAL.md)."""

from tinyvlm_jax.eval.benchmarks import (BENCHMARKS, MAX_NEW_TOKENS, EvalItem, read_benchmark,
                                         score_benchmark)
from tinyvlm_jax.eval.metrics import (eval_mmmu_multi_choice, eval_mmmu_open, normalize_vqa_answer,
                                      parse_mmmu_multi_choice, parse_mmmu_open, parse_pope, pope_scores,
                                      realworldqa_correct, vqa_accuracy)

__all__ = [
    "BENCHMARKS", "MAX_NEW_TOKENS", "EvalItem", "read_benchmark", "score_benchmark",
    "eval_mmmu_multi_choice", "eval_mmmu_open", "normalize_vqa_answer", "parse_mmmu_multi_choice",
    "parse_mmmu_open", "parse_pope", "pope_scores", "realworldqa_correct", "vqa_accuracy",
]
