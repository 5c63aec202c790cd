"""Metrics: accuracy, macro-F1 (classification) and chrF (sonnets, through sacrebleu's CHRF)."""

from __future__ import annotations

from collections.abc import Sequence


def accuracy(gold: Sequence[int], predicted: Sequence[int]) -> float:
    if len(gold) != len(predicted) or not gold:
        raise ValueError(f"accuracy needs equal, non-empty lists (got {len(gold)} gold, {len(predicted)} predicted)")
    return sum(g == p for g, p in zip(gold, predicted, strict=True)) / len(gold)


def macro_f1(gold: Sequence[int], predicted: Sequence[int], labels: Sequence[int] | None = None) -> float:
    """Unweighted mean of per-class F1 over `labels` (default: every class seen in gold or predicted);
    a class with no gold and no predicted examples is left out, one with 0 precision and recall counts 0."""
    if len(gold) != len(predicted) or not gold:
        raise ValueError("macro_f1 needs equal, non-empty lists")
    labels = sorted(set(gold) | set(predicted)) if labels is None else list(labels)
    scores = []
    for label in labels:
        tp = sum(g == label and p == label for g, p in zip(gold, predicted, strict=True))
        fp = sum(g != label and p == label for g, p in zip(gold, predicted, strict=True))
        fn = sum(g == label and p != label for g, p in zip(gold, predicted, strict=True))
        if tp + fp + fn == 0:
            continue
        scores.append(2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores)


def chrf(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus chrF (sacrebleu defaults: char 6-grams, beta 2), as the course scores sonnets."""
    from sacrebleu.metrics import CHRF

    if len(hypotheses) != len(references) or not hypotheses:
        raise ValueError(f"chrF needs equal, non-empty lists ({len(hypotheses)} vs {len(references)})")
    return float(CHRF().corpus_score(list(hypotheses), [list(references)]).score)
