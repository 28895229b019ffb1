"""``neurenix.optim``: PyTorch's own optimizers (``neurenix.optim.Adam is torch.optim.Adam``)."""

from torch.optim import *  # noqa: F401,F403  (re-export)
from torch.optim import lr_scheduler  # noqa: F401
from torch.optim import __all__  # noqa: F401
