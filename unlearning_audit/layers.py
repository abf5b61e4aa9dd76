"""Which modules and parameters belong to which layer.

One numbering serves every stage, so that a CKA value, a Fisher summary and a weight change for
"layer 3" always speak of the same place in the network:

* layer 0: the token embeddings;
* layer i, 1 <= i <= L: decoder block i - 1 (its output, for activations);
* layer L + 1: everything after the last block (final norm, LM head), for parameters only.

Blocks are matched by their exact index in the module path, never by substring, so
``layers.1`` can never pick up ``layers.10``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from torch import nn


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The qualified name and the module list of the model's repeated decoder blocks.

    Picks the ``ModuleList`` holding the most parameters, which is the block stack in every
    Hugging Face causal LM (``model.layers`` for Llama, ``transformer.h`` for GPT-2).
    """
    lists = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) > 0
    ]
    if not lists:
        raise ValueError(f"{type(model).__name__} has no list of decoder blocks")
    return max(lists, key=lambda item: sum(p.numel() for p in item[1].parameters()))


def check_layers(layers: Iterable[int] | None, n_blocks: int) -> list[int]:
    """Validate activation layer indices (0 = embeddings, 1..n_blocks = blocks); None = all."""
    if layers is None:
        return list(range(n_blocks + 1))
    chosen = sorted(set(layers))
    bad = [layer for layer in chosen if not 0 <= layer <= n_blocks]
    if bad:
        raise ValueError(
            f"layer index {bad} does not exist: the model has layers 0 (embeddings) "
            f"to {n_blocks} (decoder blocks)"
        )
    return chosen


def parameter_layers(model: nn.Module) -> dict[str, int]:
    """Map each trainable parameter's name to its layer index (see the module docstring)."""
    prefix, blocks = decoder_blocks(model)
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    embedding_ids = {id(p) for p in model.get_input_embeddings().parameters()}
    head = len(blocks) + 1
    mapping = {}
    for name, param in model.named_parameters():
        match = pattern.match(name)
        if match:
            mapping[name] = int(match.group(1)) + 1
        elif id(param) in embedding_ids:
            mapping[name] = 0
        else:
            mapping[name] = head
    return mapping
