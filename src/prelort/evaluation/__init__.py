"""Evaluation: accuracy by choice log-likelihood, ROUGE-L on greedy answers, perplexity."""

from prelort.evaluation.lm import (
    LMEvaluator,
    answer_nll,
    batch_choice_logprobs,
    choice_logprobs,
    greedy_generate,
)
from prelort.evaluation.metrics import accuracy, rouge_l

__all__ = [
    "LMEvaluator",
    "accuracy",
    "answer_nll",
    "batch_choice_logprobs",
    "choice_logprobs",
    "greedy_generate",
    "rouge_l",
]
