"""Exemplar selection and nearest-mean classification: the functional maths (herding, closest to
the mean, class sums, nearest-mean scores) against hand-worked values, then FeatureExtractor,
select_exemplars and NearestMeanClassifier."""

from __future__ import annotations

from collections import OrderedDict

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from neurenix.continual import functional as CF
from neurenix.continual.base import evaluation_mode
from neurenix.continual.capture import ForwardCapture
from neurenix.continual.exemplars import FeatureExtractor, NearestMeanClassifier, select_exemplars
from neurenix.continual.memory import ClassBalancedMemory, ExemplarMemory

CPU = torch.device("cpu")

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


# ------------------------------------------------------------------------- FeatureExtractor
def two_stage(seed: int = 0, batch_norm: bool = False) -> nn.Sequential:
    """``backbone`` (2 -> 3, tanh) then ``head`` (3 -> 4)."""
    torch.manual_seed(seed)
    layers = [nn.Linear(2, 3), nn.Tanh()] + ([nn.BatchNorm1d(3)] if batch_norm else [])
    return nn.Sequential(OrderedDict(backbone=nn.Sequential(*layers), head=nn.Linear(3, 4)))


def test_feature_extractor_by_module_and_by_name():
    model = two_stage()
    x = torch.randn(5, 2)
    expected = model.backbone(x)
    for given in (model.backbone, "backbone"):
        features = FeatureExtractor(model, given)(x)
        assert features.dtype == torch.float32 and torch.equal(features, expected)
    assert torch.equal(FeatureExtractor(model, "backbone.0")(x), model.backbone[0](x))


def test_feature_extractor_flattens_and_hides_its_forward_from_captures():
    conv = nn.Sequential(OrderedDict(features=nn.Conv2d(1, 2, 3), head=nn.Sequential(nn.Flatten(), nn.Linear(8, 3))))
    x = torch.randn(4, 1, 4, 4)
    assert torch.equal(FeatureExtractor(conv, "features")(x), conv.features(x).flatten(1))
    capture = ForwardCapture(conv)
    capture.install()
    FeatureExtractor(conv, "features")(x)
    assert capture.output is None  # another method reading the training forward does not see it


def test_feature_extractor_refuses_what_is_not_there_or_not_features():
    model = two_stage()
    with pytest.raises(ValueError, match=r"feature_extractor='encoder' names no submodule of Sequential; its submodules include \['backbone', 'backbone.0', 'backbone.1', 'head'\]"):
        FeatureExtractor(model, "encoder")
    with pytest.raises(ValueError, match=r"feature_extractor=Linear is not a submodule of Sequential"):
        FeatureExtractor(model, nn.Linear(2, 3))
    with pytest.raises(TypeError, match=r"feature_extractor must be a torch.nn.Module or its name, got int: 3"):
        FeatureExtractor(model, 3)

    class ToScalar(nn.Module):
        def forward(self, x):
            return x.sum()

    scalar = nn.Sequential(OrderedDict(reduce=ToScalar()))
    with pytest.raises(ValueError, match=r"feature_extractor='reduce' must output a tensor of \(N, \.\.\.\) features, got a tensor of shape \(\)"):
        FeatureExtractor(scalar, "reduce")(torch.randn(3, 2))
    unused = nn.ModuleDict({"used": nn.Linear(2, 2), "unused": nn.Linear(2, 2)})
    unused.forward = lambda x: unused["used"](x)
    with pytest.raises(ValueError, match=r"feature_extractor='unused' did not run in ModuleDict's forward"):
        FeatureExtractor(unused, "unused")(torch.randn(3, 2))


# ------------------------------------------------------------------------- select_exemplars
def classes_data(seed: int = 0, per_class: int = 7):
    """Inputs of three classes (labels 3, 5, 6), interleaved."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(3 * per_class, 2, generator=generator)
    y = torch.tensor([3, 5, 6]).repeat(per_class)
    return x, y


def expected_exemplars(model, x, y, quota, order_of):
    """Per class, the inputs ``order_of`` picks from its normalized backbone features."""
    with torch.no_grad():
        features = F.normalize(model.backbone(x), dim=1)
    picked = {}
    for label in y.unique().tolist():
        positions = (y == label).nonzero().squeeze(1)
        picked[label] = x[positions[order_of(features[positions], quota)]].tolist()
    return picked


def stored_by_class(memory: ExemplarMemory) -> dict[int, list[list[float]]]:
    state = memory.state_dict()
    by_rank = torch.argsort(state["ranks"], stable=True)
    out: dict[int, list] = {}
    for i in by_rank.tolist():
        out.setdefault(int(state["targets"][i]), []).append(state["inputs"][i].tolist())
    return {key: out[key] for key in sorted(out)}


@pytest.mark.parametrize("strategy, order_of", [("herding", CF.herding_order), ("closest", CF.closest_to_mean_order)])
@pytest.mark.parametrize("form", ["tensors", "dataloader", "shuffled dataloader", "iterable"])
def test_select_exemplars_keeps_each_classs_ranked_prefix(strategy, order_of, form):
    model = two_stage(batch_norm=True).train()
    x, y = classes_data()
    data = {
        "tensors": (x, y),
        "dataloader": DataLoader(TensorDataset(x, y), batch_size=4),
        "shuffled dataloader": DataLoader(TensorDataset(x, y), batch_size=4, shuffle=True),
        "iterable": [(x[i : i + 5], y[i : i + 5]) for i in range(0, 21, 5)],
    }[form]
    memory = ExemplarMemory(9, CPU, seed=0)
    before_rng, before_stats = torch.get_rng_state(), model.backbone[2].running_mean.clone()
    kept = select_exemplars(memory, FeatureExtractor(model, model.backbone), data, task_id=2, strategy=strategy)
    assert kept == {3: 3, 5: 3, 6: 3}
    with torch.no_grad(), evaluation_mode(model):
        assert stored_by_class(memory) == expected_exemplars(model, x, y, 3, order_of)
    assert memory.state_dict()["ranks"].tolist() == [0, 1, 2] * 3
    assert (memory.state_dict()["task_ids"] == 2).all()
    # Eval mode while selecting (batch-norm statistics untouched), training mode restored, the
    # global generator as it was (a shuffled loader draws its order from it otherwise).
    assert model.training and model.backbone[2].training
    assert torch.equal(model.backbone[2].running_mean, before_stats) and torch.equal(torch.get_rng_state(), before_rng)


def test_select_exemplars_next_task_shrinks_old_classes_to_their_herding_prefix():
    model = two_stage()
    x, y = classes_data(per_class=8)
    memory = ExemplarMemory(12, CPU, seed=0)
    extractor = FeatureExtractor(model, "backbone")
    select_exemplars(memory, extractor, (x[y != 6], y[y != 6]), task_id=0)  # classes 3, 5: 6 each
    first = stored_by_class(memory)
    assert {k: len(v) for k, v in first.items()} == {3: 6, 5: 6}
    select_exemplars(memory, extractor, (x[y == 6], y[y == 6]), task_id=1)  # 12 / 3 = 4 each
    second = stored_by_class(memory)
    assert second[3] == first[3][:4] and second[5] == first[5][:4]
    assert second[6] == expected_exemplars(model, x[y == 6], y[y == 6], 4, CF.herding_order)[6]


def test_random_selection_is_seeded_by_the_memory_and_runs_no_forward():
    model = two_stage()
    x, y = classes_data()
    calls = []
    model.backbone.register_forward_hook(lambda *args: calls.append(1))
    chosen = []
    for _ in range(2):
        memory = ExemplarMemory(6, CPU, seed=4)
        select_exemplars(memory, FeatureExtractor(model, "backbone"), (x, y), task_id=0, strategy="random")
        chosen.append(stored_by_class(memory))
    assert chosen[0] == chosen[1] and {k: len(v) for k, v in chosen[0].items()} == {3: 2, 5: 2, 6: 2}
    assert calls == []
    other = ExemplarMemory(6, CPU, seed=5)
    select_exemplars(other, FeatureExtractor(model, "backbone"), (x, y), task_id=0, strategy="random")
    assert stored_by_class(other) != chosen[0]


def test_select_exemplars_refuses_bad_input_with_the_memory_unchanged():
    model = two_stage()
    x, y = classes_data()
    memory = ExemplarMemory(6, CPU, seed=0)
    extractor = FeatureExtractor(model, "backbone")
    with pytest.raises(ValueError, match=r"strategy must be one of 'herding', 'closest', 'random'; got 'mean'"):
        select_exemplars(memory, extractor, (x, y), 0, strategy="mean")
    with pytest.raises(ValueError, match=r"targets must be class labels \(a 1-D integer tensor\), got targets of shape \(21,\) and dtype torch.float32"):
        select_exemplars(memory, extractor, (x, y.float()), 0)
    bad = x.clone()
    bad[4, 1], bad[9, 0] = float("nan"), float("inf")
    for strategy in ("herding", "random"):
        with pytest.raises(ValueError, match=r"the task's data holds 2 samples with NaN or infinite inputs"):
            select_exemplars(memory, extractor, (bad, y), 0, strategy=strategy)
    with pytest.raises(ValueError, match=r"the data yielded no batch"):
        select_exemplars(memory, extractor, [], 0)
    with pytest.raises(TypeError, match=r"the task's data must be a DataLoader, .* got int"):
        select_exemplars(memory, extractor, 3, 0)
    with pytest.raises(TypeError, match=r"memory must be an ExemplarMemory, got ClassBalancedMemory"):
        select_exemplars(ClassBalancedMemory(6, CPU, seed=0), extractor, (x, y), 0)
    assert len(memory) == 0 and memory.classes == [] and memory.num_seen == 0


# ------------------------------------------------------------------------- NearestMeanClassifier
def test_nearest_mean_classifier_by_hand():
    # Identity features: the exemplars of class 0 are (3, 4) and (4, 3) -> normalized (.6, .8),
    # (.8, .6), mean (.7, .7), normalized (1/√2, 1/√2); class 2's single exemplar (0, -2) -> (0, -1).
    model = nn.Sequential(OrderedDict(features=nn.Identity(), head=nn.Linear(2, 3)))
    memory = ExemplarMemory(4, CPU, seed=0)
    memory.add_ranked(torch.tensor([[3.0, 4.0], [4.0, 3.0], [0.0, -2.0]]), torch.tensor([0, 0, 2]), 0, torch.tensor([0, 1, 0]))
    classifier = NearestMeanClassifier(model, "features", memory)
    classifier.update_means()
    r = 2**-0.5
    assert classifier.means.flatten().tolist() == pytest.approx([r, r, 0.0, 0.0, 0.0, -1.0])
    assert classifier.seen.tolist() == [True, False, True]
    # (1, 0): to class 0 ‖(1−r, −r)‖² = 2 − 2r = 0.586, to class 2 ‖(1, 1)‖² = 2; class 1: −inf.
    # (−1, −5) normalizes to (−0.196, −0.981): class 2 is nearer.
    scores = classifier(torch.tensor([[1.0, 0.0], [-1.0, -5.0]]))
    assert scores[0].tolist() == pytest.approx([-(2 - 2 * r), float("-inf"), -2.0])
    assert classifier.predict(torch.tensor([[1.0, 0.0], [-1.0, -5.0]])).tolist() == [0, 2]


def test_nearest_mean_classifier_state_and_refusals(tmp_path):
    model = two_stage()
    memory = ExemplarMemory(6, CPU, seed=0)
    classifier = NearestMeanClassifier(model, model.backbone, memory)
    with pytest.raises(RuntimeError, match=r"has no class means: call update_means\(\) once the memory holds exemplars"):
        classifier.predict(torch.zeros(1, 2))
    x, y = classes_data()
    select_exemplars(memory, classifier.extractor, (x, y), task_id=0)
    classifier.update_means()
    torch.save(classifier.state_dict(), tmp_path / "ncm.pt")
    restored = NearestMeanClassifier(model, "backbone", memory)
    restored.load_state_dict(torch.load(tmp_path / "ncm.pt", weights_only=True))
    assert torch.equal(restored.scores(x), classifier.scores(x))
    with pytest.raises(ValueError, match=r"a FeatureExtractor of another model"):
        NearestMeanClassifier(two_stage(), classifier.extractor, memory)


def test_nearest_mean_classifier_refreshes_its_means_when_the_exemplars_change():
    model = two_stage()
    x, y = classes_data()
    memory = ExemplarMemory(9, CPU, seed=0)
    fresh, fixed = (NearestMeanClassifier(model, "backbone", memory, refresh=r) for r in (True, False))
    select_exemplars(memory, fresh.extractor, (x[y == 3], y[y == 3]), task_id=0)
    fixed.update_means()
    assert torch.equal(fresh.scores(x), fixed.scores(x))  # computed on first use
    select_exemplars(memory, fresh.extractor, (x[y != 3], y[y != 3]), task_id=1)
    assert fresh.seen.tolist() == [False, False, False, True]  # not recomputed until scored
    after = fresh.scores(x)
    assert fresh.seen.tolist() == [False] * 3 + [True, False, True, True]
    assert after.shape == (21, 7) and fixed.scores(x).shape == (21, 4)  # refresh=False keeps the old means
    fixed.update_means()
    assert torch.equal(fixed.scores(x), after)


def test_nearest_mean_classifier_as_the_forgetting_curves_predictor_under_a_trainer():
    # ExperienceReplay selects by herding at each task's end (listed first), ForgettingCurves then
    # measures the NCM over the new exemplars: the matrix equals NCM accuracies computed by hand.
    from neurenix.continual import ExperienceReplay
    from neurenix.data import TaskDataset, TaskSequenceDataModule, fit_sequence
    from neurenix.metrics import ForgettingCurves
    from tests.helpers import lit_classifier, quiet_trainer

    def task(t):
        g = torch.Generator().manual_seed(t)
        x = torch.randn(40, 2, generator=g) + 3 * t
        return TaskDataset(x, (x[:, 0] > 3 * t).long() + 2 * t, t)

    tasks = [task(0), task(1)]
    net = two_stage()
    replay = ExperienceReplay(net, 8, 0.5, seed=0, selection="herding", feature_extractor=net.backbone)
    classifier = NearestMeanClassifier(net, net.backbone, replay.memory)
    curves = ForgettingCurves(predictor=classifier)
    by_hand = []

    class Measure(L.Callback):  # after ForgettingCurves: what NCM predicts at each task's end
        def on_train_end(self, trainer, pl_module):
            reference = NearestMeanClassifier(net, "backbone", replay.memory)
            reference.update_means()
            by_hand.append([(reference.predict(t.inputs) == t.targets).double().mean().item() for t in tasks])

    datamodule = TaskSequenceDataModule(tasks, tasks, batch_size=8)
    fit_sequence(quiet_trainer(callbacks=[replay, curves, Measure()]), lit_classifier(net), datamodule, epochs_per_task=1)
    assert curves.matrix.accuracies().flatten().tolist() == pytest.approx(sum(by_hand, []), abs=1e-12)
    assert by_hand[0][1] == 0.0  # task 1's classes have no exemplars yet: never predicted
