"""Checkpoints: where they come from, how they are checked, loaded and saved.

A checkpoint spec is one of:

* ``embedded``: the built-in tiny model (built by the fetch stage, see embedded.py);
* a local folder holding a Hugging Face causal LM;
* ``s3://bucket/prefix`` (or any fsspec URL) holding the same files;
* a hub id pinned to a revision, ``org/name@revision`` (resolved to its commit; works offline
  from the local Hugging Face cache with HF_HUB_OFFLINE=1).

A fetched checkpoint is known by its content: ``identity`` names what it is before it is copied
(file hashes, S3 ETags, or the hub commit) and ``materialize`` copies exactly that: a file that
changed in between is refused.

Untrusted by default: weights load from safetensors only, and a config or tokenizer that needs
``trust_remote_code`` is refused; both can be allowed explicitly. A checkpoint folder is an
untrusted tree: every reader here (identity, materialize, check_folder, describe) reads only
regular files directly inside it, never through a link (a hub snapshot's links into its own
repo's blobs excepted), never a FIFO or device, and small files only up to METADATA_LIMIT.

The modules, one concern each: ``tree`` (the untrusted folder reader, and which names are a
checkpoint's files), ``fetch`` (parse, pin, identity, materialize), ``checks`` (check_folder,
config.json), ``weights`` (which weights transformers loads), ``coverage`` (do they cover the
model), ``tokenizer`` (does it load), ``compat`` (describe, compatibility_problems), ``problems``
(how problems are told); load and save are here. A module's settings are read where they are
defined (a test sets ``checkpoints.tree.METADATA_LIMIT``).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path

from .checks import check_folder, num_blocks, safetensors_weights
from .compat import compatibility_problems, describe
from .coverage import _bounded_build, _TooLarge
from .fetch import (
    EMBEDDED,
    CheckpointChanged,
    CheckpointSpec,
    identity,
    materialize,
    parse,
    pin,
)
from .problems import _refuse, _some
from .tree import METADATA, METADATA_LIMIT, PICKLE_WEIGHTS, WEIGHTS, _fd_path, _Tree, wanted

__all__ = [
    "EMBEDDED",
    "METADATA",
    "METADATA_LIMIT",
    "PICKLE_WEIGHTS",
    "WEIGHTS",
    "CheckpointChanged",
    "CheckpointSpec",
    "StoredTensors",
    "_TooLarge",
    "_Tree",
    "_bounded_build",
    "check_folder",
    "compatibility_problems",
    "describe",
    "identity",
    "load",
    "materialize",
    "num_blocks",
    "parse",
    "pin",
    "safetensors_weights",
    "save",
    "stored_tensors",
    "wanted",
]

log = logging.getLogger(__name__)


# -- loading and saving ----------------------------------------------------------------------


def load(
    folder: Path,
    device=None,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    gpus: int = 1,
):
    """The model (eval mode, on ``device``) and tokenizer saved in ``folder``, once check_folder
    passes; a ValueError naming the parameters if transformers still reports some missing from
    the weights (ones it would fill with random values: a rename check_folder cannot follow,
    model code, or pickle weights, whose names it does not read).

    The weights load in the checkpoint's own dtype (``dtype="auto"``: config.json's, else the
    weights'), asked for explicitly: transformers 4 loads in float32 by default, doubling a
    bf16 model's memory. Training stages change the dtype for training (training.fit).

    With ``gpus`` > 1 and a CUDA ``device``, the model is split over the first ``gpus``
    visible GPUs instead, whole blocks on each, balanced by their free memory (transformers'
    device_map="auto", see :func:`split_placement`): for inference, a model too large for one
    GPU. Its first parameters (the embeddings) are on the first GPU, where the stages put its
    inputs."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    check_folder(folder, allow_pickle, trust_remote_code)
    placement = split_placement(device, gpus)
    model, info = AutoModelForCausalLM.from_pretrained(
        folder,
        dtype="auto",
        use_safetensors=not allow_pickle or None,
        trust_remote_code=trust_remote_code,
        output_loading_info=True,
        **placement,
    )
    _refuse(folder, _loading_problems(model, info) + _offloaded(model, gpus))
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    if device is not None and not placement:
        model.to(device)
    return model.eval(), tokenizer


def split_placement(device, gpus: int) -> dict:
    """from_pretrained's placement arguments for a model split over ``gpus`` GPUs: none (load,
    then move to ``device``) unless ``gpus`` > 1 and ``device`` is CUDA; then device_map
    "auto" with each of the first ``gpus`` GPUs offering its free memory and the CPU none (a
    model too large for them is refused: :func:`_offloaded`)."""
    import torch

    if gpus == 1 or device is None or torch.device(device).type != "cuda":
        return {}
    return {
        "device_map": "auto",
        "max_memory": {index: torch.cuda.mem_get_info(index)[0] for index in range(gpus)},
    }


def _offloaded(model, gpus: int) -> list[str]:
    """The modules a split model (device_map) placed off its GPUs (on the CPU or disk, where
    accelerate puts what does not fit: a stage would crawl), as a problem to refuse."""
    placement = getattr(model, "hf_device_map", {})
    off = sorted(name for name, where in placement.items() if str(where) in ("cpu", "disk"))
    if not off:
        return []
    return [
        f"the model does not fit in the free memory of {gpus} GPUs: {_some(off)} would run "
        "from host memory or disk; give more GPUs (gpus)"
    ]


def _loading_problems(model, info: dict) -> list[str]:
    """Parameters transformers left unloaded (its missing keys, after ties and the keys the
    model declares ignorable); buffers are the model's own to compute, not reported."""
    missing = []
    for key in sorted(info.get("missing_keys") or ()):
        try:
            model.get_parameter(key)
        except AttributeError:
            continue
        missing.append(key)
    problems = []
    if missing:
        problems.append(
            "the weights leave parameters of the model config.json describes unset (transformers "
            f"would fill them with random values): {_some(missing)}"
        )
    if mismatched := sorted(str(k[0]) for k in info.get("mismatched_keys") or ()):
        problems.append(f"tensors of the wrong shape: {_some(mismatched)}")
    if unexpected := sorted(info.get("unexpected_keys") or ()):
        log.warning("checkpoint tensors transformers did not load: %s", _some(unexpected))
    return problems


def save(model, tokenizer, folder: Path, state_dict: dict | None = None) -> None:
    """Save weights as safetensors, with config and tokenizer; the weights of ``state_dict``
    where given (a sharded model's, gathered: distributed.full_state_dict)."""
    model.save_pretrained(folder, safe_serialization=True, state_dict=state_dict)
    tokenizer.save_pretrained(folder)


class StoredTensors(Mapping):
    """A checkpoint's stored tensors by name, each read (on the CPU) only when looked up."""

    def __init__(self, handles: dict) -> None:
        self._handles = handles  # a tensor's name: the open safetensors file holding it

    def __getitem__(self, name: str):
        return self._handles[name].get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._handles)

    def __len__(self) -> int:
        return len(self._handles)

    def shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape, from its file's header (no data read)."""
        return tuple(self._handles[name].get_slice(name).get_shape())


@contextlib.contextmanager
def stored_tensors(folder: Path) -> Iterator[StoredTensors]:
    """The tensors of the safetensors weights transformers loads from a checked ``folder``
    (safetensors_weights: one file, or an index's shards), by their names in the files, read one
    at a time: a checkpoint compared tensor by tensor without building its model. Empty where
    it holds pickle weights (a fetched checkpoint never does: fetch converts them)."""
    from safetensors import safe_open

    tree = _Tree(Path(folder))
    source = safetensors_weights(folder)
    if source is None:
        files = []
    elif source.endswith(".json"):
        files = sorted(set(tree.json(source)["weight_map"].values()))
    else:
        files = [source]
    with contextlib.ExitStack() as opened:
        handles = {}
        for name in files:
            f = opened.enter_context(tree.open(name))
            st = opened.enter_context(safe_open(_fd_path(f), "pt", device="cpu"))
            handles |= dict.fromkeys(st.keys(), st)
        yield StoredTensors(handles)
