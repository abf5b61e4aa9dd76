"""Quantization as a recovery attack: round-to-nearest weight quantization on CPU or GPU.

Zhang et al. 2024 saw forgotten-knowledge retention rise from 21% to 83% under 4-bit
quantization: an unlearning edit smaller than the quantization step is rounded away. Symmetric
per-output-channel RTN: for a row w of a weight matrix, scale s = max|w| / (2^(b-1) - 1) and
q(w) = s * clamp(round(w / s), -(2^(b-1) - 1), 2^(b-1) - 1), so |w - q(w)| <= s / 2 elementwise.
"""

from __future__ import annotations

import torch
from torch import nn


def quantize_rtn(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """The RTN-quantized (and dequantized) copy of a 2-D weight, one scale per output row."""
    if weight.ndim != 2:
        raise ValueError(f"RTN quantizes 2-D weights, got shape {tuple(weight.shape)}")
    if not 2 <= bits <= 16:
        raise ValueError(f"bits must be between 2 and 16, got {bits}")
    qmax = 2 ** (bits - 1) - 1
    w = weight.float()
    scale = w.abs().amax(dim=1, keepdim=True) / qmax
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    return (torch.clamp(torch.round(w / scale), -qmax, qmax) * scale).to(weight.dtype)


@torch.no_grad()
def quantize_model(model: nn.Module, bits: int) -> int:
    """Quantize every linear layer's weight in place, except the LM head (and embeddings),
    as weight-only quantization schemes do; returns how many matrices were quantized."""
    head = model.get_output_embeddings()
    count = 0
    for module in model.modules():
        if isinstance(module, nn.Linear) and module is not head:
            module.weight.copy_(quantize_rtn(module.weight, bits))
            count += 1
    return count
