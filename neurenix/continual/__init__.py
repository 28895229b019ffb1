"""Continual-learning methods: each a Lightning callback and a plain-PyTorch helper at once.

Lightning::

    trainer = L.Trainer(callbacks=[EWC(module, importance=1000.0)])

Plain PyTorch (the Neurenix continual-learning API)::

    ewc = EWC(model, importance=1000.0)
    ewc.train_step(optimizer, loss_fn, inputs, targets, task_id=1)
"""

from neurenix.continual.base import ContinualMethod
from neurenix.continual.bic import BiC
from neurenix.continual.boundary import ShiftDetector, TaskBoundaryDetector
from neurenix.continual.callback import ContinualCallback
from neurenix.continual.dark_replay import DarkExperienceReplay
from neurenix.continual.distillation import KnowledgeDistillation
from neurenix.continual.er_ace import ERACE
from neurenix.continual.ewc import EWC
from neurenix.continual.exemplars import FeatureExtractor, NearestMeanClassifier, select_exemplars
from neurenix.continual.gdumb import GDumb
from neurenix.continual.gradient_episodic import AGEM, GEM
from neurenix.continual.icarl import ICaRL
from neurenix.continual.l2 import L2Regularization
from neurenix.continual.mas import MAS
from neurenix.continual.memory import (
    ClassBalancedMemory,
    ExemplarMemory,
    ReplayBatch,
    ReservoirMemory,
    TaskBalancedMemory,
)
from neurenix.continual.mixin import ContinualLossMixin
from neurenix.continual.rehearsal import RehearsalMethod
from neurenix.continual.replay import ExperienceReplay
from neurenix.continual.rwalk import RWalk
from neurenix.continual.seen_classes import SeenClassMask, mark_seen_classes
from neurenix.continual.synaptic_intelligence import SynapticIntelligence

__all__ = [
    "AGEM",
    "BiC",
    "ClassBalancedMemory",
    "ShiftDetector",
    "TaskBoundaryDetector",
    "ContinualCallback",
    "ContinualLossMixin",
    "ContinualMethod",
    "DarkExperienceReplay",
    "ERACE",
    "EWC",
    "ExemplarMemory",
    "ExperienceReplay",
    "FeatureExtractor",
    "GDumb",
    "GEM",
    "ICaRL",
    "KnowledgeDistillation",
    "L2Regularization",
    "MAS",
    "NearestMeanClassifier",
    "RehearsalMethod",
    "ReplayBatch",
    "ReservoirMemory",
    "RWalk",
    "select_exemplars",
    "SeenClassMask",
    "mark_seen_classes",
    "SynapticIntelligence",
    "TaskBalancedMemory",
]
