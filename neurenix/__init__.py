"""neurenix: continual learning for PyTorch Lightning.

``import neurenix as nx`` gives the names of the Neurenix continual-learning API: ``nx.nn``, ``nx.optim``,
``nx.data``, ``nx.continual``, ``nx.Device`` and ``nx.init()``.
"""

from __future__ import annotations

import importlib
import random
from typing import TYPE_CHECKING, Any, Optional

__version__ = "0.1.0"

__all__ = ["Device", "automl", "continual", "data", "init", "metrics", "nn", "optim", "__version__"]

#: Imported on first use (``nx.continual``, ``from neurenix import data``): ``import neurenix`` and
#: the ``neurenix`` command's help need neither torch nor Lightning.
_SUBMODULES = ("automl", "continual", "data", "metrics", "nn", "optim")

if TYPE_CHECKING:
    import torch

    from neurenix import automl, continual, data, metrics, nn, optim

    #: ``neurenix.Device`` is ``torch.device``: ``nx.Device("cpu")``, ``nx.Device("cuda", 0)``.
    Device = torch.device


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        value: Any = importlib.import_module(f"neurenix.{name}")
    elif name == "Device":  # ``torch.device``: ``nx.Device("cpu")``, ``nx.Device("cuda", 0)``
        import torch

        value = torch.device
    else:
        raise AttributeError(f"module 'neurenix' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


def init(seed: Optional[int] = None) -> int:
    """Prepare a session: seed Python's, NumPy's (if installed) and PyTorch's generators.

    Calling it again is harmless: it only seeds again.

    Args:
        seed: the seed; ``None`` keeps the seed PyTorch already has (``torch.initial_seed()``),
            so a run seeded elsewhere (``lightning.seed_everything``) is left as it is.

    Returns:
        The seed in use.

    Raises:
        TypeError: ``seed`` is not an ``int``.
        ValueError: ``seed`` is negative or does not fit in 64 bits.
    """
    import torch

    if seed is None:
        return torch.initial_seed()
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int or None, got {seed!r}")
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed!r}")
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy
    except ImportError:
        pass
    else:
        numpy.random.seed(seed % 2**32)
    return seed
