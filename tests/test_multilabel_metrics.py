"""Multi-label metrics: average precision as scikit-learn defines it (hand-computed cases with ties,
and a brute-force reference), mAP, F1, exact match, thresholds chosen on validation, bad input."""

from __future__ import annotations

import logging
import math
import re

import pytest
import torch

from transferkit.errors import TransferkitError
from transferkit.report.multilabel import average_precision, choose_thresholds, multilabel_metrics


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def _reference_ap(scores: list[float], truth: list[int]) -> float:
    """sklearn's definition the slow way: sum over distinct thresholds t, high to low, of
    (recall at t - recall at the previous t) * precision at t, counting every image scoring >= t."""
    total, prev_recall = 0.0, 0.0
    for t in sorted(set(scores), reverse=True):
        tp = sum(1 for s, y in zip(scores, truth) if s >= t and y == 1)
        fp = sum(1 for s, y in zip(scores, truth) if s >= t and y == 0)
        recall = tp / sum(truth)
        total += (recall - prev_recall) * tp / (tp + fp)
        prev_recall = recall
    return total


def _ap(scores: list[float], truth: list[int]) -> float | None:
    return average_precision(torch.tensor(scores), torch.tensor(truth))


def test_average_precision_matches_sklearn_values_on_hand_computed_cases():
    # the example in scikit-learn's average_precision_score docstring gives 0.8333...
    assert _ap([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(5 / 6)
    assert _ap([4.0, 3.0, 2.0, 1.0], [1, 1, 0, 0]) == pytest.approx(1.0)  # perfect ranking
    # reversed ranking: P = 1/3 at recall 1/2, P = 1/2 at recall 1 -> 1/6 + 1/4
    assert _ap([4.0, 3.0, 2.0, 1.0], [0, 0, 1, 1]) == pytest.approx(5 / 12)
    # a positive tied with a negative enters with it (P = 2/3 at recall 1), whichever comes first
    assert _ap([2.0, 1.0, 1.0], [1, 1, 0]) == pytest.approx(1 / 2 + 1 / 2 * 2 / 3)
    assert _ap([2.0, 1.0, 1.0], [1, 0, 1]) == pytest.approx(5 / 6)
    assert _ap([1.0, 1.0, 1.0, 1.0], [0, 1, 0, 0]) == pytest.approx(1 / 4)  # all tied: prevalence
    assert _ap([1.0, 2.0], [0, 0]) is None  # no positive: nothing to recall


def test_average_precision_equals_the_brute_force_definition_with_many_ties():
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        n = int(torch.randint(2, 30, (1,), generator=g))
        scores = torch.randint(0, 5, (n,), generator=g).double() / 4  # few values: many ties
        truth = torch.randint(0, 2, (n,), generator=g)
        truth[0] = 1
        assert _ap(scores.tolist(), truth.tolist()) == pytest.approx(
            _reference_ap(scores.tolist(), truth.tolist()), abs=1e-12)


def test_map_is_1_for_a_perfect_ranking_and_known_for_a_reversed_one():
    targets = torch.tensor([[1, 0], [1, 0], [0, 1], [0, 1]])
    perfect = torch.tensor([[3.0, -3.0], [2.0, -2.0], [-2.0, 2.0], [-3.0, 3.0]])
    m = multilabel_metrics(perfect, targets, ["dog", "car"])
    assert m["map"] == pytest.approx(1.0)
    assert m["micro_f1"] == m["macro_f1"] == m["exact_match"] == pytest.approx(1.0)
    reversed_ = -perfect
    m = multilabel_metrics(reversed_, targets, ["dog", "car"])
    assert m["map"] == pytest.approx(5 / 12)
    assert m["micro_f1"] == m["macro_f1"] == m["exact_match"] == 0.0


def test_f1_exact_match_and_per_label_table_at_given_thresholds():
    classes = ["dog", "car", "tree"]
    targets = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 1, 0], [0, 0, 0]])
    probs = torch.tensor([[0.9, 0.6, 0.2], [0.4, 0.7, 0.1], [0.3, 0.8, 0.6], [0.2, 0.1, 0.3]])
    logits = probs.double().logit()
    m = multilabel_metrics(logits, targets, classes)
    # at 0.5: dog TP1 FN1; car TP2 FP1; tree FP1 (no positive image)
    dog, car, tree = m["per_label"]
    assert (dog["precision"], dog["recall"], dog["f1"], dog["support"]) == (1.0, 0.5, pytest.approx(2 / 3), 2)
    assert (car["precision"], car["recall"], car["f1"]) == (pytest.approx(2 / 3), 1.0, pytest.approx(0.8))
    assert tree["support"] == 0 and tree["ap"] is None and tree["f1"] == 0.0
    assert m["labels_without_positives"] == 1
    assert m["map"] == pytest.approx((dog["ap"] + car["ap"]) / 2)  # tree left out of the mean
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0.8) / 2)
    assert m["micro_f1"] == pytest.approx(2 * 3 / (2 * 3 + 2 + 1))  # TP 3, FP 2, FN 1
    assert m["exact_match"] == 0.5  # images 0 and 3 are right on every label
    assert m["images"] == 4 and [r["threshold"] for r in m["per_label"]] == [0.5] * 3
    # a stricter threshold for car drops its false positive, and its hit on image 0
    m = multilabel_metrics(logits, targets, classes, thresholds=[0.5, 0.75, 0.5])
    assert m["per_label"][1]["precision"] == 1.0 and m["per_label"][1]["recall"] == 0.5
    assert m["exact_match"] == 0.25


def test_a_label_with_no_positive_image_anywhere_gives_no_map():
    m = multilabel_metrics(torch.zeros(3, 2), torch.zeros(3, 2), ["a", "b"])
    assert m["map"] is None and m["macro_f1"] is None and m["labels_without_positives"] == 2


def _skewed(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A rare label the model scores low: positives near logit -1, negatives near -3."""
    g = torch.Generator().manual_seed(seed)
    targets = (torch.rand(n, 1, generator=g) < 0.1).long()
    logits = torch.where(targets.bool(), -1.0, -3.0) + 0.7 * torch.randn(n, 1, generator=g)
    return logits, targets


def test_thresholds_chosen_on_validation_improve_f1_on_another_split():
    val, test = _skewed(400, seed=1), _skewed(400, seed=2)
    thresholds = choose_thresholds(*val, classes=["rare"])
    assert thresholds[0] < 0.5
    at_half = multilabel_metrics(*test, ["rare"])["micro_f1"]
    chosen = multilabel_metrics(*test, ["rare"], thresholds)["micro_f1"]
    assert at_half < 0.3 and chosen > 0.7  # 0.5 misses most of the rare label's images
    assert choose_thresholds(*val) == thresholds  # identical on a second call


def test_threshold_ties_take_the_lower_and_reproduce_the_best_f1():
    # cuts after each image: F1 2/3 (1 TP), 1/2, 2/5, 2/3 (2 TP, 2 FP): the lower 2/3 wins
    logits = torch.tensor([[2.0], [1.0], [0.0], [-1.0]])
    targets = torch.tensor([[1], [0], [0], [1]])
    (t,) = choose_thresholds(logits, targets)
    assert t == pytest.approx(1 / (1 + math.e) / 2)  # halfway below the lowest score it keeps
    m = multilabel_metrics(logits, targets, ["x"], [t])
    assert m["per_label"][0]["f1"] == pytest.approx(2 / 3) and m["per_label"][0]["recall"] == 1.0
    # tied scores are cut together: the best here keeps both 0.7s (F1 2/3) over the 0.9 alone (1/2)
    logits = torch.tensor([[_logit(0.9)], [_logit(0.7)], [_logit(0.7)], [_logit(0.1)]])
    (t,) = choose_thresholds(logits, torch.tensor([[0], [1], [0], [1]]))
    assert t == pytest.approx(0.05)  # all four: F1 2*2/(2+2+2) = 2/3, equal to both 0.7s, lower


def test_a_label_without_positives_keeps_threshold_half_and_says_so(caplog):
    logits = torch.tensor([[2.0, 0.3], [-1.0, -0.2]])
    with caplog.at_level(logging.WARNING, logger="transferkit.report.multilabel"):
        thresholds = choose_thresholds(logits, torch.tensor([[1, 0], [0, 0]]), classes=["cat", "fern"])
    # halfway between the positive's probability and the next lower one: no image sits on its threshold
    assert thresholds == [pytest.approx((1 / (1 + math.exp(-2.0)) + 1 / (1 + math.e)) / 2), 0.5]
    assert "fern" in caplog.text and "0.5" in caplog.text and "cat" not in caplog.text


def test_results_are_identical_across_calls_and_image_orders():
    g = torch.Generator().manual_seed(3)
    logits = torch.randint(-3, 4, (60, 4), generator=g).float()  # many ties
    targets = (torch.rand(60, 4, generator=g) < 0.3).long()
    first = multilabel_metrics(logits, targets, list("abcd"))
    assert multilabel_metrics(logits, targets, list("abcd")) == first
    perm = torch.randperm(60, generator=g)
    assert multilabel_metrics(logits[perm], targets[perm], list("abcd")) == first
    assert choose_thresholds(logits[perm], targets[perm]) == choose_thresholds(logits, targets)


@pytest.mark.parametrize("logits, targets, classes, thresholds, says", [
    (torch.zeros(3, 2), torch.zeros(3, 3), ["a", "b"], None, "shape (3, 2)"),
    (torch.zeros(3), torch.zeros(3), ["a"], None, "(images, labels)"),
    (torch.zeros(2, 2), torch.tensor([[1, 0], [0.5, 1]]), ["a", "b"], None, "0 or 1; image 1, label 0 ('a')"),
    (torch.zeros(2, 2), torch.tensor([[1, 0], [2, 1]]), ["a", "b"], None, "holds 2"),
    (torch.zeros(0, 2), torch.zeros(0, 2), ["a", "b"], None, "no images"),
    (torch.zeros(2, 2), torch.zeros(2, 2), ["a"], None, "2 labels but 1 label names"),
    (torch.zeros(2, 2), torch.zeros(2, 2), ["a", "b"], [0.5], "2 probabilities between 0 and 1"),
    (torch.zeros(2, 2), torch.zeros(2, 2), ["a", "b"], [0.5, 1.5], "between 0 and 1"),
    (torch.tensor([[0.0, float("nan")], [0, 0]]), torch.zeros(2, 2), ["a", "b"], None, "is NaN"),
])
def test_bad_input_is_refused_with_a_sentence(logits, targets, classes, thresholds, says):
    with pytest.raises(TransferkitError, match=re.escape(says)):
        multilabel_metrics(logits, targets, classes, thresholds)
    if thresholds is None and len(classes) == (logits.shape[-1] if logits.dim() else 0):
        with pytest.raises(TransferkitError):
            choose_thresholds(logits, targets, classes)
