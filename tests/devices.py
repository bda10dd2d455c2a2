"""Where the suite computes, and how one process runs both the interpreted and the compiled kernels.

The suite's numeric tests run on CPU in float32 on every machine: conftest.py sets
``SOFTPROMPT_DEVICE=cpu`` (the runtime's default device, ``runtime/factory.py``; inherited by the
servers and jobs the tests start) and ``TRITON_INTERPRET=1`` (the Triton kernels interpreted on
CPU tensors). Tests marked ``cuda`` (tests/test_cuda.py) ask for ``device="cuda"`` explicitly and
run the compiled kernels: ``triton_compiled()`` re-imports the kernel bodies without the
interpreter for them and restores it after. Without a CUDA device they are collected and
skipped with ``SKIP_REASON``; on a GPU machine ``pytest -m cuda`` runs them alone
(bench/gpu_check.sh does).
"""

from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Iterator

import torch

HAS_CUDA = torch.cuda.is_available()
SKIP_REASON = ("needs a CUDA device (torch.cuda.is_available() is False here); on a GPU machine "
               "run `pytest -m cuda` or `bash bench/gpu_check.sh`")
BODIES = "softprompt.kernels._triton"  # the @triton.jit definitions; launchers look them up there


def kernel_bodies_interpreted() -> bool:
    """True when the loaded kernel bodies run under the Triton interpreter."""
    body = importlib.import_module(BODIES)._prefix_attention_fwd
    return type(body).__name__ == "InterpretedFunction"


@contextlib.contextmanager
def triton_compiled() -> Iterator[None]:
    """The kernel bodies as compiled kernels (TRITON_INTERPRET unset, bodies re-imported) while
    open; the interpreter as it was after. ``triton.jit`` decides interpreted or compiled when a
    body is defined, and the launchers look the bodies up in their module at launch time, so
    re-importing that one module switches every kernel."""
    mod = importlib.import_module(BODIES)
    saved = os.environ.pop("TRITON_INTERPRET", None)
    importlib.reload(mod)
    try:
        yield
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved
        importlib.reload(mod)
