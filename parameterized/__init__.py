"""Parameterized optimizer families whose coefficients are learned by hyper-gradient descent.

>>> from parameterized import MADA, HyperAdam
"""

from .mada import COEFFICIENTS, MADA, VARIANTS, HyperAdam

__all__ = ["MADA", "HyperAdam", "COEFFICIENTS", "VARIANTS"]
