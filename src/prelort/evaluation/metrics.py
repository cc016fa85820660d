"""Plain metric functions on strings and labels."""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any


@lru_cache(maxsize=1)
def _scorer() -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, references: Sequence[str]) -> float:
    """ROUGE-L F-measure of ``prediction``, best over ``references`` (Lin 2004).

    F = (1 + b^2) R P / (R + b^2 P) with b = 1, P = LCS / |pred|, R = LCS / |ref| over
    stemmed word tokens (``rouge-score``'s ``rougeL``).
    """
    if not references:
        raise ValueError("rouge_l needs at least one reference")
    scorer = _scorer()
    return max(float(scorer.score(ref, prediction)["rougeL"].fmeasure) for ref in references)


def accuracy(predictions: Sequence[int], answers: Sequence[int]) -> float:
    """Fraction of predictions equal to the answer."""
    if len(predictions) != len(answers) or not answers:
        raise ValueError("accuracy needs equally many predictions and answers, at least one")
    return sum(int(p == a) for p, a in zip(predictions, answers, strict=True)) / len(answers)
