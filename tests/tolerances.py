"""The tests read the package's one tolerance table (``softprompt/tolerances.py``); KERNEL is
keyed by torch dtype here for the kernel tests' convenience."""

import torch

from softprompt.tolerances import KERNEL as _KERNEL, DECODE_GRAPH, ONNX, SCORE, SCORE_CPU_BF16, SCORE_DEFAULT_MODEL  # noqa: F401

KERNEL = {getattr(torch, name): tol for name, tol in _KERNEL.items()}
