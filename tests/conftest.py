import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
torch.set_num_threads(1)


@pytest.fixture
def float64_default():
    """torch.optim keeps scalar state (step, NAdam's mu_product) in float64 only when the default
    dtype is float64; the reference comparisons run under it so both sides compute in float64."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)
