"""`Linear`: a weight matrix applied as y = x W^T (+ b), through oneDNN's prepacked layout on CPU."""

from __future__ import annotations

import torch
import torch.nn.functional as F

PACKED_DTYPES = (torch.float32, torch.bfloat16)
PACK_BATCH_HINT = 32  # the decode batch oneDNN tunes the packed layout for (any batch works)


class Linear:
    """y = x W^T (+ b) for 2-D x; on CPU through a oneDNN weight prepacked once at load.

    The prepacked (blocked) copy makes small-batch decode GEMMs 1.2-2x faster than F.linear on the plain weight,
    in float32 and bfloat16 alike; the plain weight is kept as `weight`. Other dtypes/devices use F.linear.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        self.weight, self.bias = weight, bias
        self._packed = None
        if weight.device.type == "cpu" and weight.dtype in PACKED_DTYPES and torch.backends.mkldnn.is_available():
            try:
                self._packed = torch.ops.mkldnn._reorder_linear_weight(weight, PACK_BATCH_HINT)
                self(torch.zeros(1, weight.shape[1], dtype=weight.dtype))
            except (RuntimeError, AttributeError):  # no oneDNN kernel for this build/CPU: stay on F.linear
                self._packed = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._packed is None or x.dim() != 2:
            return F.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self._packed, self.bias, "none", [], "")
