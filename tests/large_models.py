"""The large models the estimator is held to, built from their configs on the meta device
(nothing downloaded), and the 6-method audit the README sizes for them: shared by
tests/test_plan.py and bench/bench_scale.py."""

from __future__ import annotations

from unlearning_audit.config import METHODS, AuditParams, UnlearnConfig


def large_configs() -> dict:
    """Llama configs of 1B, 7B and 70B-class models (bf16 checkpoints)."""
    from transformers import LlamaConfig

    common = {"dtype": "bfloat16", "max_position_embeddings": 4096}
    return {
        "1B (Llama-3.2-1B)": LlamaConfig(
            hidden_size=2048,
            num_hidden_layers=16,
            intermediate_size=8192,
            vocab_size=128256,
            num_attention_heads=32,
            num_key_value_heads=8,
            tie_word_embeddings=True,
            **common,
        ),
        "7B (Llama-2-7B)": LlamaConfig(
            hidden_size=4096,
            num_hidden_layers=32,
            intermediate_size=11008,
            vocab_size=32000,
            num_attention_heads=32,
            num_key_value_heads=32,
            **common,
        ),
        "70B (Llama-3-70B)": LlamaConfig(
            hidden_size=8192,
            num_hidden_layers=80,
            intermediate_size=28672,
            vocab_size=128256,
            num_attention_heads=64,
            num_key_value_heads=8,
            **common,
        ),
    }


def six_method_audit(**update) -> AuditParams:
    """A 6-method audit of a large checkpoint with a never-learned control, every other
    setting at its default (relearning from forget and forget-half, 3 seeds, Fisher of at most
    16 samples per pass over all layers, gradient checkpointing auto, 8- and 4-bit
    quantization)."""
    return AuditParams(
        original="org/model@main",
        control="org/control@main",
        methods=[UnlearnConfig(method=m, lr=1e-5) for m in METHODS],
        **update,
    )
