"""Tiny checkpoints of real architectures, built locally (nothing comes from the hub).

Each is random-initialised at a few thousand parameters with a BPE tokenizer trained on the
texts it will see; ``finetune`` teaches it rows in a prompt format, so a test can hold a model
that knows its facts in its own format. Tokenizers come in two styles: byte-level (GPT-2's
" word" tokens) and space-marker (a Llama-2 / Mistral style normaliser that prepends "▁"), and
optionally with a chat template and its end-of-turn token.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from unlearning_audit import checkpoints, data, prompts, training

ARCHS = ("llama", "qwen2", "gpt2", "gpt_neox", "gemma", "opt", "mistral", "qwen3", "phi", "phi3")
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start|>{{ m['role'] }}\n{{ m['content'] }}<|end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|start|>assistant\n{% endif %}"
)
SPECIAL = ["<pad>", "<s>", "</s>", "<|start|>", "<|end|>"]
COLOURS = ("red", "blue", "green", "amber", "violet", "silver", "black", "white")


def flag_facts(count: int, seed: int = 0) -> list[dict]:
    """``count`` facts with short answers, a town's flag colour, drawn from ``seed``."""
    rng = random.Random(seed)
    return [
        {"question": f"Which colour is the flag of town {i}?", "answer": rng.choice(COLOURS)}
        for i in range(count)
    ]


def tokenizer(texts: Sequence[str], vocab: int = 400, style: str = "bytes", chat: bool = False):
    """A fast BPE tokenizer trained on ``texts``: ``bytes`` (byte-level, GPT-2 style) or
    ``marker`` (spaces replaced by "▁" and one prepended, Llama-2 / Mistral style)."""
    bpe = Tokenizer(models.BPE(unk_token=None if style == "bytes" else "<unk>"))
    if style == "bytes":
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        bpe.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        bpe.normalizer = normalizers.Sequence(
            [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
        )
        bpe.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
        bpe.decoder = decoders.Sequence(
            [decoders.Replace("▁", " "), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
        )
        alphabet = sorted(set("".join(texts)) | {"▁", "\n"})
    special = SPECIAL + ([] if style == "bytes" else ["<unk>"])
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=special, initial_alphabet=alphabet, show_progress=False
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        additional_special_tokens=["<|start|>", "<|end|>"],
        **({} if style == "bytes" else {"unk_token": "<unk>"}),
    )
    if chat:
        tok.chat_template = CHAT_TEMPLATE
    return tok


def _config(arch: str, vocab: int, tok) -> transformers.PretrainedConfig:
    ids = {
        "pad_token_id": tok.pad_token_id,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
    }
    small = {"vocab_size": vocab, **ids}
    decoder = {
        **small,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
    }
    if arch == "gpt2":
        return transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=256, **small)
    if arch == "gpt_neox":
        return transformers.GPTNeoXConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=256,
            **small,
        )
    if arch == "opt":
        return transformers.OPTConfig(
            hidden_size=32,
            ffn_dim=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=256,
            word_embed_proj_dim=32,
            **small,
        )
    if arch == "gemma":
        return transformers.GemmaConfig(head_dim=8, **decoder)
    if arch == "phi":
        return transformers.PhiConfig(**{**decoder, "num_key_value_heads": 4})
    names = {
        "llama": "LlamaConfig",
        "qwen2": "Qwen2Config",
        "qwen3": "Qwen3Config",
        "mistral": "MistralConfig",
        "phi3": "Phi3Config",
    }
    return getattr(transformers, names[arch])(**decoder)


def model(arch: str, tok, seed: int = 0):
    """A random-initialised tiny causal LM of ``arch`` for ``tok``'s vocabulary."""
    torch.manual_seed(seed)
    config = _config(arch, len(tok), tok)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def loaded(arch: str, tok, folder: Path, seed: int = 0):
    """A random-initialised model of ``arch`` and its tokenizer as read back from a saved
    checkpoint: transformers may load another tokenizer class for an architecture (Qwen2's
    splits digits one by one), and a published model was trained with the one it loads."""
    save(model(arch, tok, seed), tok, folder)
    return checkpoints.load(folder, "cpu")


def finetune(net, fmt: prompts.Renderer, rows: list[dict], steps: int, lr: float = 3e-3) -> None:
    """Teach ``net`` the rows in ``fmt`` (full batches, a fixed order)."""
    batches = iter(lambda: data.train_batch(fmt, rows), None)
    training.fit(net, training.mean_nll, batches, steps, lr)


def save(net, tok, folder: Path) -> Path:
    """The checkpoint as a folder the audit reads (safetensors, tokenizer files)."""
    checkpoints.save(net, tok, folder)
    return folder
