"""``neurenix.nn``: PyTorch's own ``torch.nn`` classes under the names the Neurenix continual-learning API uses.

Nothing here wraps or changes PyTorch: ``neurenix.nn.Linear is torch.nn.Linear``.
"""

from torch.nn import *  # noqa: F401,F403  (re-export, see module docstring)
from torch.nn import functional, init, utils  # noqa: F401
from torch.nn import Module, Sequential, Linear, ReLU, CrossEntropyLoss  # noqa: F401  (names the document uses)
