"""Fixtures shared by the kernel tests."""
import pytest
import torch


@pytest.fixture
def nan_outputs(monkeypatch):
    """Outputs of the row/elementwise kernels (rms_norm, rope, swiglu) allocated NaN-filled, so an
    element a kernel forgets to write fails the test. Each module calls its own `_alloc` name."""
    from megatron_code.kernels import rms_norm, rope, swiglu

    def alloc(shape, like, dtype=None):
        return torch.full(shape, float("nan"), dtype=dtype or like.dtype, device=like.device)
    for module in (rms_norm, rope, swiglu):
        monkeypatch.setattr(module, "_alloc", alloc)
