"""A Llama with a memory limit, for the Fisher's out-of-memory tests: a forward pass over more
than ``config.max_samples`` samples at once raises torch.cuda.OutOfMemoryError, as a GPU too
small for the pass would. Samples vmapped by torch.func count: the per-sample-gradient pass over
b samples is one forward pass over b of them.

It is also a checkpoint's own model code (tests copy this file into a checkpoint folder, named
by config.json's auto_map), so it imports nothing from the tests.
"""

from __future__ import annotations

import torch
from transformers import LlamaForCausalLM


def samples(x: torch.Tensor) -> int:
    """How many samples ``x`` holds at once: its leading dimension times the size of every
    torch.func batch (vmap) level wrapped around it."""
    functorch = torch._C._functorch
    real = x
    while functorch.is_functorch_wrapped_tensor(real):
        real = functorch.get_unwrapped(real)
    return real.numel() // x.numel() * x.shape[0]


class MemoryLimitedLlama(LlamaForCausalLM):
    """LlamaForCausalLM that runs out of memory above ``config.max_samples`` samples."""

    def forward(self, input_ids=None, inputs_embeds=None, **kwargs):
        given = inputs_embeds if inputs_embeds is not None else input_ids
        if samples(given) > self.config.max_samples:
            raise torch.cuda.OutOfMemoryError(
                f"CUDA out of memory: {samples(given)} samples at once, room for "
                f"{self.config.max_samples}"
            )
        return super().forward(input_ids=input_ids, inputs_embeds=inputs_embeds, **kwargs)
