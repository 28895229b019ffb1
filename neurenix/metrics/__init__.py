"""Continual-learning metrics: the accuracy matrix and what is read from it."""

from neurenix.metrics import functional
from neurenix.metrics.accuracy_matrix import AccuracyMatrix
from neurenix.metrics.forgetting_curves import ForgettingCurves
from neurenix.metrics.functional import average_accuracy, backward_transfer, forgetting, forward_transfer

__all__ = ["AccuracyMatrix", "ForgettingCurves", "average_accuracy", "backward_transfer", "forgetting", "forward_transfer", "functional"]
