"""The embedded default checkpoint: a BPE tokenizer and a tiny Llama pretrained on CPU.

Built from the synthetic corpus (corpus.py), deterministic from the seed, and trained until the
model knows the forget set (greedy exact match and answer-token accuracy above the targets), so
that forgetting is measurable. The never-learned control is the same recipe without the forget
groups: what a model that never saw those facts does under the same relearning.

The control must not be handicapped: both models also pretrain on a directory row per group
(corpus.directory: the group's name, no fact), so every token of a forget row occurs in rows the
control trains on; the input embeddings and the LM head are separate matrices, so weight change
and Fisher tell them apart.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from . import corpus, data, prompts, runtime, training
from .config import EmbeddedConfig
from .corpus import Fact
from .evaluation import evaluate

log = logging.getLogger(__name__)

SPECIAL = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>"}


def train_tokenizer(facts: Sequence[Fact], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on every prompt and answer of the corpus."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = [prompts.QA_TEMPLATE.format(question=f.question, answer=f.answer) for f in facts]
    bpe.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, **SPECIAL)


def build_model(tokenizer: PreTrainedTokenizerFast, config: EmbeddedConfig) -> LlamaForCausalLM:
    """A freshly initialised tiny Llama sized by ``config``."""
    return LlamaForCausalLM(
        model_config(
            config,
            len(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    )


def model_config(config: EmbeddedConfig, vocab_size: int, **token_ids: int) -> LlamaConfig:
    """The Llama config of the embedded model of ``config`` with a tokenizer of
    ``vocab_size`` tokens (and its special ``token_ids``); plan.py sizes it before building."""
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.layers,
        num_attention_heads=config.heads,
        num_key_value_heads=config.heads,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        **token_ids,
    )


def pretrain(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    train_rows: list[dict],
    target_rows: list[dict],
    config: EmbeddedConfig,
    seed: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Train on ``train_rows`` (in an order drawn from ``seed``, default the config's) until
    ``target_rows`` meet the config's targets. ``progress(step, max_steps)`` follows the
    training loop (it stops at the targets, usually well before max_steps).

    Checks every ``eval_every`` steps; raises RuntimeError if ``max_steps`` pass first, so a
    model that cannot show forgetting is never handed on.
    """
    history: list[dict] = []
    fmt = prompts.renderer(tokenizer, prompts.QA_TEMPLATE)

    def reached(step: int) -> bool:
        if step % config.eval_every:
            return False
        scores = evaluate(model, fmt, target_rows)
        history.append(
            {
                "step": step,
                "exact_match": scores["exact_match"],
                "token_accuracy": scores["token_accuracy"],
            }
        )
        model.train()
        log.info("pretrain step %d: %s", step, history[-1])
        return reached_targets(scores, config)

    batches = (
        data.train_batch(fmt, rows)
        for rows in data.shuffled_batches(
            train_rows, config.batch_size, config.seed if seed is None else seed
        )
    )
    losses = training.fit(
        model,
        training.mean_nll,
        batches,
        config.max_steps,
        config.lr,
        reached,
        warmup=config.warmup,
        progress=progress,
    )
    if not history or not reached_targets(history[-1], config):
        raise RuntimeError(
            f"pretraining did not reach exact match {config.target_exact_match} and token "
            f"accuracy {config.target_token_accuracy} in {config.max_steps} steps: {history[-1:]}"
        )
    return {"steps": len(losses), "final_loss": losses[-1], "checks": history}


def reached_targets(scores: dict, config: EmbeddedConfig) -> bool:
    """Whether a check met both pretraining targets."""
    return (
        scores["exact_match"] >= config.target_exact_match
        and scores["token_accuracy"] >= config.target_token_accuracy
    )


def build(
    config: EmbeddedConfig,
    control: bool = False,
    variant: int = 0,
    progress: Callable[[int, int], None] | None = None,
):
    """The embedded model (or, with ``control``, its never-learned control), pretrained.

    Safe to call from two threads at once (the audit builds the model and its control side by
    side, one core each).
    ``variant`` > 0 draws another initialisation and data order from the same corpus: a second
    never-learned model, the known answer of a calibration audit. Returns the model, its
    tokenizer and the pretraining log. ``progress`` follows pretraining (see pretrain).
    """
    seed = config.seed + 1000 * variant
    facts, forget = corpus.embedded(config)
    rows = [
        {"question": f.question, "answer": f.answer, "forget": f.group in forget} for f in facts
    ]
    names = [{"question": f.question, "answer": f.answer} for f in corpus.directory(facts)]
    train = [r for r in rows if not (control and r["forget"])] + names
    target = [r for r in rows if r["forget"] != control]
    tokenizer = train_tokenizer(facts, config.vocab_size)
    with runtime.SEEDING:  # torch's generator is global: no other seeding in between
        runtime.setup(seed, "cpu")
        model = build_model(tokenizer, config)
    log = pretrain(model, tokenizer, train, data.sample(target, 400), config, seed, progress)
    return model, tokenizer, log
