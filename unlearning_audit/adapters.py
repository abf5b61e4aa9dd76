"""LoRA adapters (peft) for the training stages: train a low-rank update instead of every weight,
compare against the frozen base without a second copy of it, and store the update alone.

A stored adapter is two files, ``adapter_config.json`` and ``adapter_model.safetensors`` (never
pickle); the model it adapts is the stage's input checkpoint, which loading resolves (an adapter on
an adapter folds in order). LoRA targets every linear layer of the blocks (peft's "all-linear":
not the LM head), with alpha = 2 x rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"


@dataclass
class Adapter:
    """A trained LoRA update, detached from its model: its tensors (CPU) and peft config."""

    tensors: dict[str, torch.Tensor]
    config: object  # peft.LoraConfig

    def save(self, folder: Path) -> None:
        """Write the adapter's two files into ``folder``."""
        save_file({k: v.contiguous() for k, v in self.tensors.items()}, folder / WEIGHTS)
        self.config.save_pretrained(str(folder))


def wrap(model, rank: int | None):
    """``model`` itself, or a peft LoRA wrapper of rank ``rank`` on its linear layers (only the
    adapter trains: the base's weights are frozen, in their own dtype)."""
    if not rank:
        return model
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear")
    return get_peft_model(model, config)


def is_wrapped(model) -> bool:
    """Whether ``model`` is a peft wrapper (made by :func:`wrap`)."""
    return hasattr(model, "disable_adapter")


class Frozen:
    """The base of a LoRA-wrapped model, called like a model: every call runs with the adapters
    disabled, in eval mode and without gradients, so NPO and KL read the original from the very
    weights being adapted, with no second copy."""

    def __init__(self, wrapped):
        self.wrapped = wrapped

    def __call__(self, **inputs):
        training = self.wrapped.training
        self.wrapped.eval()
        try:
            with torch.no_grad(), self.wrapped.disable_adapter():
                return self.wrapped(**inputs)
        finally:
            self.wrapped.train(training)


def detach(wrapped) -> Adapter:
    """The trained adapter of ``wrapped``, which is then merged into its base model in place:
    the base is the trained model afterwards (its weights plus the low-rank update)."""
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(wrapped)
    # sharded over several GPUs (FSDP) each rank holds a part: gather it (every rank calls this)
    whole = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in state.items()}
    tensors = {k: v.detach().to("cpu", copy=True) for k, v in whole.items()}
    adapter = Adapter(tensors, wrapped.peft_config["default"])
    wrapped.merge_and_unload()
    return adapter


def is_adapter(folder: Path) -> bool:
    """Whether a stored artifact folder holds an adapter rather than a checkpoint."""
    return (folder / CONFIG).is_file()


def apply(model, folder: Path):
    """``model`` with the adapter stored in ``folder`` merged into its weights (in place)."""
    from peft import LoraConfig, get_peft_model
    from peft.utils import set_peft_model_state_dict

    wrapped = get_peft_model(model, LoraConfig.from_pretrained(str(folder)))
    device = next(model.parameters()).device
    result = set_peft_model_state_dict(wrapped, load_file(folder / WEIGHTS, device=str(device)))
    if result.unexpected_keys:
        raise ValueError(
            f"{folder}: adapter tensors its config does not describe: {result.unexpected_keys[:5]}"
        )
    return wrapped.merge_and_unload().eval()
