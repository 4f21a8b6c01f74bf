"""hypergrad: PyTorch optimizers that learn their own hyperparameters while they train.

>>> import hypergrad as hg
>>> opt = hg.Adam(model.parameters(), lr=1e-3, hyper=hg.SGD(lr=1e-5, hyper=hg.SGD(lr=1e-6)))
"""

from .core import Hyper, HyperOptimizer, compute_dtype, hyper_dtype
from .recorder import Recorder, plot_trajectories, read_log
from .schedule import ScaledSchedule, scale_schedule
from .wrap import WrappedOptimizer, wrap
from .optimizers import (OPTIMIZERS, SGD, Adadelta, Adafactor, Adagrad, Adam, Adan, AdamW, Lion, NAdam,
                         RMSprop, Yogi)

__version__ = "0.1.0"

__all__ = ["Hyper", "HyperOptimizer", "hyper_dtype", "compute_dtype", "wrap", "WrappedOptimizer", "scale_schedule", "ScaledSchedule",
           "Recorder", "plot_trajectories", "read_log",
           "OPTIMIZERS", "SGD", "Adagrad", "Adadelta", "RMSprop", "Adam", "AdamW", "NAdam", "Adan", "Yogi", "Lion",
           "Adafactor"]
