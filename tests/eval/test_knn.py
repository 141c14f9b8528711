"""The kNN evaluator on features whose answer is known, and against a float64 transcription of its vote."""
from __future__ import annotations

import math

import pytest
import torch

from rela.eval.knn import knn_accuracy


def _knn_predict_reference(train_x, train_y, query, num_classes, k, temperature) -> int:
    """Wu et al. 2018 in float64: the k most cosine-similar training rows vote exp(sim / T) for their class."""
    train_x, query = train_x.double(), query.double()
    sims = [float(query @ row) / (float(query.norm()) * float(row.norm())) for row in train_x]
    nearest = sorted(range(len(sims)), key=lambda i: -sims[i])[:k]
    votes = [0.0] * num_classes
    for i in nearest:
        votes[int(train_y[i])] += math.exp(sims[i] / temperature)
    return max(range(num_classes), key=lambda c: votes[c])


def _predicted_class(train_x, train_y, query, num_classes, **kwargs) -> int:
    """The class knn_accuracy predicts for one query: the one label it scores as correct."""
    hits = [c for c in range(num_classes)
            if knn_accuracy(train_x, train_y, query[None], torch.tensor([c]), num_classes, **kwargs) == 1.0]
    assert len(hits) == 1
    return hits[0]


def _at_similarity(s: float) -> list[float]:
    """A 2-D unit vector whose cosine similarity to (1, 0) is s."""
    return [s, math.sqrt(1 - s * s)]


def test_well_separated_clusters_are_classified_perfectly():
    generator = torch.Generator().manual_seed(0)
    num_classes, dim = 5, 32
    centres = torch.randn(num_classes, dim, generator=generator) * 10
    train_y, val_y = torch.arange(200) % num_classes, torch.arange(75) % num_classes
    train_x = centres[train_y] + torch.randn(200, dim, generator=generator)
    val_x = centres[val_y] + torch.randn(75, dim, generator=generator)
    assert knn_accuracy(train_x, train_y, val_x, val_y, num_classes, k=20) == 1.0


# One neighbour of class 1 at similarity 0.9, three of class 0 at 0.6: k and T decide the vote.
CLOSE_ONE_FAR_THREE = dict(train_x=torch.tensor([_at_similarity(0.9)] + [_at_similarity(0.6)] * 3),
                           train_y=torch.tensor([1, 0, 0, 0]))


@pytest.mark.parametrize("k, temperature, winner", [
    (1, 1.0, 1),    # only the nearest votes
    (4, 0.07, 1),   # exp(0.9 / 0.07) > 3 exp(0.6 / 0.07): the sharp weighting lets the nearest win
    (4, 1.0, 0),    # e^0.9 = 2.5 < 3 e^0.6 = 5.5: the flat weighting lets the majority win
])
def test_k_and_temperature_decide_the_vote(k, temperature, winner):
    query = torch.tensor([1.0, 0.0])
    data = CLOSE_ONE_FAR_THREE
    assert _knn_predict_reference(data["train_x"], data["train_y"], query, 2, k, temperature) == winner
    assert _predicted_class(data["train_x"], data["train_y"], query, 2, k=k, temperature=temperature) == winner


def test_small_temperature_gives_a_finite_correct_vote():
    """At T = 0.005, exp(sim / T) is inf in float32 for sim > 0.44; the nearest neighbour (class 1, 0.99)
    must still beat five of class 0 at 0.98: 1 > 5 exp(-0.01 / 0.005) = 0.68."""
    train_x = torch.tensor([_at_similarity(0.99)] + [_at_similarity(0.98)] * 5)
    train_y = torch.tensor([1, 0, 0, 0, 0, 0])
    query = torch.tensor([1.0, 0.0])
    assert _knn_predict_reference(train_x, train_y, query, 2, 6, 0.005) == 1
    assert _predicted_class(train_x, train_y, query, 2, k=6, temperature=0.005) == 1


@pytest.mark.parametrize("k, temperature", [(1, 0.07), (5, 0.07), (20, 0.5), (7, 0.01), (50, 0.07)])
def test_predictions_match_float64_transcription(k, temperature):
    generator = torch.Generator().manual_seed(k)
    num_classes = 4
    train_x, train_y = torch.randn(40, 8, generator=generator), torch.randint(0, num_classes, (40,), generator=generator)
    val_x = torch.randn(12, 8, generator=generator)
    for query in val_x:
        expected = _knn_predict_reference(train_x, train_y, query, num_classes, min(k, 40), temperature)
        assert _predicted_class(train_x, train_y, query, num_classes, k=k, temperature=temperature) == expected


def test_accuracy_does_not_depend_on_the_chunk_size():
    generator = torch.Generator().manual_seed(3)
    train_x, train_y = torch.randn(60, 8, generator=generator), torch.randint(0, 3, (60,), generator=generator)
    val_x, val_y = torch.randn(31, 8, generator=generator), torch.randint(0, 3, (31,), generator=generator)
    accuracies = {knn_accuracy(train_x, train_y, val_x, val_y, 3, k=5, chunk=chunk) for chunk in (1, 4, 31, 1024)}
    assert len(accuracies) == 1
