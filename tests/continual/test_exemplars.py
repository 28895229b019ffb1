"""Exemplar selection and nearest-mean classification: the functional maths (herding, closest to
the mean, class sums, nearest-mean scores) against hand-worked values, then FeatureExtractor,
select_exemplars and NearestMeanClassifier."""

from __future__ import annotations

import pytest
import torch

from neurenix.continual import functional as CF

D = torch.float64

#: Five 2-D points for the hand-worked orders below; their mean is μ = (1.8, 1.8).
POINTS = torch.tensor([[0.0, 0.0], [4.0, 0.0], [0.0, 4.0], [4.0, 4.0], [1.0, 1.0]], dtype=D)


# ------------------------------------------------------------------------- herding_order
def test_herding_order_by_hand():
    # Pick k minimizes ‖k·μ − S − φ_i‖² over the unpicked i (S: the sum of the picks so far).
    # k=1, target μ = (1.8, 1.8): p0 6.48, p1 8.08, p2 8.08, p3 9.68, p4 (1,1) 0.64+0.64 = 1.28 -> p4
    # k=2, target 2μ − (1,1) = (2.6, 2.6): p0 13.52, p1 1.4²+2.6² = 8.72, p2 8.72, p3 1.4²·2 = 3.92 -> p3
    # k=3, target 3μ − (5,5) = (0.4, 0.4): p0 0.32, p1 3.6²+0.4² = 13.12, p2 13.12 -> p0
    # k=4, target 4μ − (5,5) = (2.2, 2.2): p1 1.8²+2.2² = 8.08, p2 8.08: a tie, the lower index -> p1
    # k=5: p2.
    assert CF.herding_order(POINTS, 5).tolist() == [4, 3, 0, 1, 2]
    # Herding is not closest-to-the-mean: that order is p4 1.28, p0 6.48, p1 = p2 8.08, p3 9.68.
    assert CF.closest_to_mean_order(POINTS, 5).tolist() == [4, 0, 1, 2, 3]


def test_herding_order_prefix_count_and_dtype():
    assert CF.herding_order(POINTS, 2).tolist() == [4, 3]  # the first picks of the full order
    assert CF.herding_order(POINTS, 9).tolist() == [4, 3, 0, 1, 2]  # at most N
    assert CF.herding_order(POINTS, 0).tolist() == []
    order = CF.herding_order(POINTS.float(), 3)
    assert order.dtype == torch.long and order.tolist() == [4, 3, 0]


def test_herding_keeps_the_running_mean_closest_to_the_mean():
    # Against the literal definition, by brute force on random points: each pick is the candidate
    # whose addition puts the running mean nearest μ.
    features = torch.randn(40, 5, generator=torch.Generator().manual_seed(3), dtype=D)
    order = CF.herding_order(features, 12).tolist()
    mu, chosen = features.mean(0), []
    for pick in order:
        gaps = {
            i: float((mu - (features[chosen].sum(0) + features[i]) / (len(chosen) + 1)).norm())
            for i in range(40)
            if i not in chosen
        }
        assert gaps[pick] == pytest.approx(min(gaps.values()), abs=1e-12)
        chosen.append(pick)
    assert len(set(order)) == 12


def test_herding_and_closest_refuse_bad_input():
    with pytest.raises(ValueError, match=r"features must be an \(N, D\) floating-point tensor, got shape \(5,\)"):
        CF.herding_order(torch.zeros(5), 2)
    with pytest.raises(ValueError, match=r"got shape \(2, 2\) and dtype torch.int64"):
        CF.closest_to_mean_order(torch.zeros(2, 2, dtype=torch.long), 2)
    with pytest.raises(ValueError, match=r"count must be an int >= 0, got -1"):
        CF.herding_order(POINTS, -1)


# ------------------------------------------------------------------------- closest_to_mean_order
def test_closest_to_mean_order_ties_by_index():
    points = torch.tensor([[2.0, 0.0], [-1.0, 0.0], [1.0, 0.0], [-2.0, 0.0], [0.0, 0.0]])  # mean 0
    assert CF.closest_to_mean_order(points, 5).tolist() == [4, 1, 2, 0, 3]
    assert CF.closest_to_mean_order(points, 2).tolist() == [4, 1]


# ------------------------------------------------------------------------- class_sums
def test_class_sums_by_hand():
    features = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0]], dtype=torch.float16)
    sums, counts = CF.class_sums(features, torch.tensor([2, 0, 2, 2]), 4)
    assert sums.dtype == torch.float32 and counts.dtype == torch.long
    assert sums.tolist() == [[3.0, 4.0], [0.0, 0.0], [13.0, 16.0], [0.0, 0.0]]
    assert counts.tolist() == [1, 0, 3, 0]
    # Summed over two "ranks" holding parts of the data, then divided: the means of the whole.
    first = CF.class_sums(features[:2], torch.tensor([2, 0]), 4)
    second = CF.class_sums(features[2:], torch.tensor([2, 2]), 4)
    means = (first[0] + second[0])[2] / (first[1] + second[1])[2]
    assert means.tolist() == pytest.approx([13 / 3, 16 / 3])


def test_class_sums_refuses_labels_out_of_range_or_misshapen():
    with pytest.raises(ValueError, match=r"labels must lie in \[0, num_classes=2\), got labels from 0 to 2"):
        CF.class_sums(torch.zeros(3, 2), torch.tensor([0, 1, 2]), 2)
    with pytest.raises(ValueError, match=r"features of shape \(3, 2\), got labels of shape \(2,\)"):
        CF.class_sums(torch.zeros(3, 2), torch.tensor([0, 1]), 2)


# ------------------------------------------------------------------------- nearest_mean_scores
def test_nearest_mean_scores_by_hand():
    features = torch.tensor([[0.0, 0.0], [3.0, 1.0]])
    means = torch.tensor([[1.0, 0.0], [3.0, 3.0], [0.0, 0.0]])
    scores = CF.nearest_mean_scores(features, means)
    # −‖f − μ_c‖²: (0,0) -> 1, 18, 0; (3,1) -> 4+1 = 5, 0+4 = 4, 9+1 = 10
    assert scores.tolist() == [[-1.0, -18.0, 0.0], [-5.0, -4.0, -10.0]]
    assert scores.argmax(1).tolist() == [2, 1]
    # A class without a mean is never predicted, however near its (placeholder) row is.
    masked = CF.nearest_mean_scores(features, means, seen=torch.tensor([True, True, False]))
    assert masked[:, 2].tolist() == [float("-inf")] * 2 and masked.argmax(1).tolist() == [0, 1]


def test_nearest_mean_scores_refuse_mismatched_means():
    with pytest.raises(ValueError, match=r"means must be \(C, D\) with D = 2 as the features, got means of shape \(3, 4\)"):
        CF.nearest_mean_scores(torch.zeros(1, 2), torch.zeros(3, 4))
    with pytest.raises(ValueError, match=r"seen must be a \(3,\) bool tensor"):
        CF.nearest_mean_scores(torch.zeros(1, 2), torch.zeros(3, 2), seen=torch.ones(2, dtype=torch.bool))
