"""Quantization as a recovery attack: round-to-nearest weight quantization on CPU or GPU.

Zhang et al. 2024 saw forgotten-knowledge retention rise from 21% to 83% under 4-bit
quantization: an unlearning edit smaller than the quantization step is rounded away. Symmetric
per-output-channel RTN: for the weights w of one output channel, scale s = max|w| / (2^(b-1) - 1)
and q(w) = s * clamp(round(w / s), -(2^(b-1) - 1), 2^(b-1) - 1), so |w - q(w)| <= s / 2
elementwise.

Every weight matrix is quantized, whatever module holds it: ``nn.Linear`` (weight (out, in), one
row per output channel), transformers' ``Conv1D`` (GPT-2; weight (in, out), one column per output
channel) and any other module's 2-D or stacked (..., out, in) weight, taken in ``F.linear``'s
convention (Mixtral-style experts, MoE routers). Lookup tables (``nn.Embedding``: token and
learned position embeddings) multiply no activation and are left alone; the input embeddings
and the LM head are quantized only on request, as weight-only schemes usually keep them.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D


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


def _weight_matrices(model: nn.Module, embeddings: bool) -> list[tuple[nn.Parameter, bool]]:
    """The model's weight matrices as (parameter, transposed), each shared parameter once.

    ``transposed`` marks a ``Conv1D`` weight, stored (in, out). The input embeddings and the LM
    head (one matrix when tied, counted as the embeddings) are included only with
    ``embeddings``; other lookup tables never are.
    """
    ends = {
        id(p)
        for module in (model.get_input_embeddings(), model.get_output_embeddings())
        if module is not None
        for p in module.parameters()
    }
    seen: set[int] = set()
    found = []
    for module in model.modules():
        for param in module.parameters(recurse=False):
            is_end = id(param) in ends
            lookup = isinstance(module, nn.Embedding) and not is_end
            if param.ndim < 2 or id(param) in seen or lookup or (is_end and not embeddings):
                continue
            seen.add(id(param))
            found.append((param, isinstance(module, Conv1D)))
    return found


@torch.no_grad()
def quantize_model(model: nn.Module, bits: int, embeddings: bool = False) -> int:
    """RTN-quantize every weight matrix of ``model`` in place (see the module doc), per
    output channel; returns how many matrices were quantized (a stacked (n, out, in) weight
    counts n). Raises ValueError when there is none, rather than report an unquantized model
    as quantized."""
    count = 0
    for param, transposed in _weight_matrices(model, embeddings):
        if transposed:
            param.copy_(quantize_rtn(param.T, bits).T)
        else:
            rows = param.reshape(-1, param.shape[-1])
            param.copy_(quantize_rtn(rows, bits).reshape(param.shape))
        count += math.prod(param.shape[:-2])
    if count == 0:
        raise ValueError(
            f"{type(model).__name__} has no weight matrix to quantize (embeddings="
            f"{embeddings}): a quantization attack on it would measure the unquantized model"
        )
    return count
