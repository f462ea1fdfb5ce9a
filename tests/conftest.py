"""Shared test setup: Triton kernels run natively on a GPU, and under Triton's interpreter on a CPU-only machine."""
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")    # must be set before any @triton.jit is decorated
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
