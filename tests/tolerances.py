"""The one tolerance table every numerical test uses.

KERNEL: a kernel against its PyTorch reference (same inputs, same dtype, float32 accumulation).
SCORE: a backend's per-token log-probabilities against the float32 reference on the single
request (PEFT or plain transformers with ``inputs_embeds``), by the backend's compute dtype.
ONNX: the exported graph under ONNX Runtime against PyTorch (DESIGN/issue: 1e-2 on logits).
"""

import torch

KERNEL = {
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
}

SCORE = {
    "float32": dict(atol=1e-4, rtol=0.0),
    "float16": dict(atol=5e-2, rtol=0.0),
    "bfloat16": dict(atol=1e-1, rtol=0.0),
}

ONNX = {
    "float32": dict(atol=1e-2, rtol=0.0),
    "float16": dict(atol=5e-2, rtol=0.0),
}
