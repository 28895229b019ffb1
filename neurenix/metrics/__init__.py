"""Continual-learning metrics: the accuracy matrix and what is read from it."""

from neurenix.metrics import functional
from neurenix.metrics.accuracy_matrix import AccuracyMatrix
from neurenix.metrics.functional import average_accuracy, backward_transfer, forgetting, forward_transfer

__all__ = ["AccuracyMatrix", "average_accuracy", "backward_transfer", "forgetting", "forward_transfer", "functional"]
