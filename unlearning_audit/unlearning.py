"""The paper's six unlearning methods: each a forget term plus an optional retain term, all
trained by the one shared loop in training.py (DESIGN.md, "Unlearning methods").

With forget batch F, retain batch R, the frozen original p0 and the current model p:

* GA:     -NLL_p(F)                       (gradient ascent on the forget answers)
* NPO:    (2/beta) mean_i log(1 + (p(F_i)/p0(F_i))^beta), sequence likelihoods
* RLabel: NLL_p(F with random wrong answers)
* +GD:    + w NLL_p(R)
* +KL:    + w KL(p0(.|R) || p(.|R)) over the retain answer positions

Losses count answer tokens only (prompt and padding carry label -100).
"""

from __future__ import annotations

import copy
import itertools
import logging
import random
from collections.abc import Callable

import torch
import torch.nn.functional as F

from . import adapters, data, training
from .config import UnlearnConfig
from .data import IGNORE
from .evaluation import default_metric, evaluate
from .prompts import Renderer

log = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]


def ga_loss(model, reference, batch: dict[str, Batch], config: UnlearnConfig) -> torch.Tensor:
    """Gradient ascent: minus the mean answer-token NLL of the forget batch."""
    return -training.mean_nll(model, batch["forget"])


def npo_loss(model, reference, batch: dict[str, Batch], config: UnlearnConfig) -> torch.Tensor:
    """Negative preference optimisation (Zhang et al. 2024) on sequence log-likelihoods."""
    logp = training.sequence_logprob(model, batch["forget"])
    with torch.no_grad():
        logp0 = training.sequence_logprob(reference, batch["forget"])
    losses = F.softplus(config.beta * (logp - logp0))
    return (2.0 / config.beta) * losses.sum() / training.batch_rows(batch["forget"])


def rlabel_loss(model, reference, batch: dict[str, Batch], config: UnlearnConfig) -> torch.Tensor:
    """Fine-tuning on the forget questions paired with random wrong answers."""
    return training.mean_nll(model, batch["forget"])


def gd_term(model, reference, batch: dict[str, Batch], config: UnlearnConfig) -> torch.Tensor:
    """Gradient descent on the retain batch: its mean answer-token NLL."""
    return training.mean_nll(model, batch["retain"])


def kl_term(model, reference, batch: dict[str, Batch], config: UnlearnConfig) -> torch.Tensor:
    """KL(p0 || p) of next-token distributions, averaged over the retain answer positions."""
    retain = batch["retain"]
    inputs = {"input_ids": retain["input_ids"], "attention_mask": retain["attention_mask"]}
    logq = torch.log_softmax(model(**inputs).logits[:, :-1].float(), -1)
    with torch.no_grad():
        logp0 = torch.log_softmax(reference(**inputs).logits[:, :-1].float(), -1)
    mask = retain["labels"][:, 1:] != IGNORE
    kl = (logp0.exp() * (logp0 - logq)).sum(-1)
    return (kl * mask).sum() / training.answer_tokens(retain, mask)


FORGET_TERMS: dict[str, Callable] = {"GA": ga_loss, "NPO": npo_loss, "RLabel": rlabel_loss}
RETAIN_TERMS: dict[str, Callable] = {"GD": gd_term, "KL": kl_term}


def method_loss(config: UnlearnConfig) -> Callable:
    """The loss of ``config.method``: its forget term plus its weighted retain term, if any."""
    forget_name, _, retain_name = config.method.partition("+")
    forget_term = FORGET_TERMS[forget_name]
    retain_term = RETAIN_TERMS.get(retain_name)

    def loss(model, reference, batch):
        value = forget_term(model, reference, batch, config)
        if retain_term is not None:
            value = value + config.retain_weight * retain_term(model, reference, batch, config)
        return value

    return loss


def needs_reference(config: UnlearnConfig) -> bool:
    """Whether the method compares against the frozen original (NPO and the KL term do)."""
    return config.method.startswith("NPO") or config.method.endswith("+KL")


def make_reference(trainable, config: UnlearnConfig):
    """The frozen original where the method needs one, else None: for a LoRA-wrapped model its
    own base with the adapters disabled (no copy), else a frozen copy."""
    if not needs_reference(config):
        return None
    if adapters.is_wrapped(trainable):
        return adapters.Frozen(trainable)
    return copy.deepcopy(trainable).eval().requires_grad_(False)


def relabel(rows: list[dict], seed: int) -> list[dict]:
    """The rows with each answer replaced by a different answer of the same attribute.

    Answers are drawn from the other rows' answers (of the same attribute where rows name one),
    so they are plausible but wrong.
    """
    rng = random.Random(seed)
    pools: dict[str, list[str]] = {}
    for r in rows:
        pools.setdefault(r.get("attribute", ""), []).append(r["answer"])
    out = []
    for r in rows:
        wrong = sorted({a for a in pools[r.get("attribute", "")] if a != r["answer"]})
        if not wrong:
            wrong = sorted({x["answer"] for x in rows if x["answer"] != r["answer"]})
        if not wrong:
            raise ValueError("RLabel needs at least two distinct answers in the forget set")
        out.append({**r, "answer": rng.choice(wrong)})
    return out


def request_parts(rows: list[dict], requests: int, split: str) -> list[list[dict]]:
    """The forget rows of each of ``requests`` successive unlearning requests.

    ``disjoint``: the rows cut in order into ``requests`` contiguous parts of sizes differing by
    at most one (each row in exactly one part; facts of one group, listed together, mostly stay
    in one request); ``repeat``: the whole set every time. Refuses more disjoint parts than rows
    (preflight says so before any training).
    """
    if requests < 1:
        raise ValueError(f"requests must be at least 1, got {requests}")
    if split == "repeat":
        return [list(rows) for _ in range(requests)]
    if split != "disjoint":
        raise ValueError(f"request_split must be 'disjoint' or 'repeat', got {split!r}")
    if requests > len(rows):
        raise ValueError(
            f"{requests} disjoint unlearning requests need at least {requests} forget rows, "
            f"the forget set has {len(rows)}"
        )
    size, extra = divmod(len(rows), requests)
    bounds = [k * size + min(k, extra) for k in range(requests + 1)]
    return [list(rows[a:b]) for a, b in itertools.pairwise(bounds)]


def unlearn(
    model,
    fmt: Renderer,
    sets: dict[str, list[dict]],
    config: UnlearnConfig,
    seed: int,
    progress: Callable[[int, int], None] | None = None,
    precision: str = "fp32",
    checkpointing: bool = False,
) -> dict:
    """Unlearn ``sets['forget']`` from ``model`` in place in ``config.requests`` successive
    requests (request_parts); returns the training log, with the trained LoRA adapter under
    ``adapter`` (adapters.Adapter; None for full training) and each request's own log under
    ``requests``.

    Each request runs the method for up to ``config.steps`` steps (steps are per request) on
    its part, with a fresh optimiser, from the model the previous request left, and with the
    same ``seed``: one request is the method run once, and ``repeat`` of a method without a
    reference (GA, GA+GD, RLabel) is that method run again and again. The frozen reference
    (NPO, KL) stays the original, the model before the first request, in every request (with
    LoRA one adapter trains through every request, the reference its base).
    With ``stop_at_forget_em`` set, a request stops at collapse on its own part: at the first
    check where that part's forget score falls below it (exact match, or for long answers
    answer-token accuracy: evaluation.default_metric of the whole forget set, where exact match
    would read 0 from the first check). ``progress(step, steps)`` follows the training loop over
    every request. An unset learning rate is the model's default (training.default_lr). The
    model trains in ``precision`` (training.fit) and ends in its own dtype; the reference stays
    in that dtype. With ``lora_rank`` only an adapter trains and is merged into ``model``
    afterwards. ``checkpointing``: gradient checkpointing (training.fit).
    """
    trainable = adapters.wrap(model, config.lora_rank)
    reference = make_reference(trainable, config)
    forget_rows = relabel(sets["forget"], seed) if config.method == "RLabel" else sets["forget"]
    parts = request_parts(forget_rows, config.requests, config.request_split)
    run = {
        "model": model,
        "trainable": trainable,
        "loss": method_loss(config),
        "reference": reference,
        "fmt": fmt,
        "retain": sets["retain"],
        "stop_metric": default_metric(sets["forget"]),  # exact match for short answers
        "lr": config.lr or training.default_lr(model),
        "precision": precision,
        "checkpointing": checkpointing,
    }
    if config.head_only:
        _freeze_body(model)
    requests = []
    for k, part in enumerate(parts):

        def advance(step: int, steps: int, done: int = k * config.steps) -> None:
            if progress is not None:
                progress(done + step, steps * len(parts))

        requests.append(_request(run, part, config, seed, advance) | {"request": k + 1})
    adapter = adapters.detach(trainable) if trainable is not model else None
    for p in model.parameters():
        p.requires_grad_(True)
    losses = [loss for r in requests for loss in r.pop("losses")]
    return {
        "adapter": adapter,
        "steps": len(losses),
        "lr": run["lr"],
        "precision": precision,
        "losses": losses,
        "checks": [c | {"request": r["request"]} for r in requests for c in r["checks"]],
        "stopped_early": any(r["stopped_early"] for r in requests),
        "requests": requests,
    }


def _request(
    run: dict, forget_rows: list[dict], config: UnlearnConfig, seed: int, progress: Callable
) -> dict:
    """One unlearning request: the method on ``forget_rows`` (and the retain rows) for up to
    ``config.steps`` steps, stopping early at collapse on these rows; ``run`` holds what every
    request shares (see unlearn). Returns the request's losses and early-stop checks."""
    model, fmt = run["model"], run["fmt"]
    forget = data.shuffled_batches(forget_rows, config.batch_size, seed)
    retain = data.shuffled_batches(run["retain"], config.batch_size, seed + 1)
    device = next(model.parameters()).device

    def batches():
        while True:
            yield {
                "forget": training.to_device(data.train_batch(fmt, next(forget)), device),
                "retain": training.to_device(data.train_batch(fmt, next(retain)), device),
            }

    checks: list[dict] = []
    metric = run["stop_metric"]

    def collapsed(step: int) -> bool:
        if config.stop_at_forget_em is None or step % config.check_every:
            return False
        score = evaluate(model, fmt, forget_rows)[metric]
        model.train()
        checks.append({"step": step, f"forget_{metric}": score})
        return score < config.stop_at_forget_em

    loss, reference = run["loss"], run["reference"]
    losses = training.fit(
        run["trainable"],
        lambda m, b: loss(m, reference, b),
        batches(),
        config.steps,
        run["lr"],
        collapsed,
        progress=progress,
        micro_batches=config.micro_batches,
        precision=run["precision"],
        checkpointing=run["checkpointing"],
    )
    return {
        "rows": len(forget_rows),
        "steps": len(losses),
        "losses": losses,
        "checks": checks,
        "stopped_early": len(losses) < config.steps,
    }


def _freeze_body(model) -> None:
    """Leave only the LM head trainable (for a tied head, the shared embedding matrix)."""
    head = {id(p) for p in model.get_output_embeddings().parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in head)
