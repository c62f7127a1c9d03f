"""Shared test set-up. Triton kernels run on CPU through the interpreter, which must be switched
on before anything imports triton (kernels are bound to interpreter or compiler at import)."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
