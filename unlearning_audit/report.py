"""The audit report: a summary row per unlearning run, a Markdown document and a self-contained
HTML page with the figures of :mod:`plots`, built from stored tables alone (no model is loaded).

The report stage stores its inputs (verdicts, metrics tables, recovery curves) beside the report
(:data:`INPUTS`), so :func:`rebuild` remakes every file from that one artifact, even after the
checkpoints and the relearning runs are gone from the store. :mod:`plots` (matplotlib) is
imported only where a page is drawn: reading a stored report's rows, as a rerun answered from
the audit index does, stays light.
"""

from __future__ import annotations

import base64
import math
from html import escape
from pathlib import Path

from . import study
from .config import METRIC_NAMES
from .evaluation import SHORT_ANSWER_WORDS
from .metrics.table import mean_over_layers
from .store import ArtifactRef, Store

STUDY_KEYS_EXTRA = ("domain", "seed", "setting", "requests")
SUMMARY_KEYS = (
    "label",
    "method",
    "lr",
    "metric",
    "forget_original",
    "forget_unlearned",
    "forget_relearned",
    "retain_original",
    "retain_unlearned",
    "advantage",
    "advantage_lower",
    "advantage_upper",
    "look",
    "p",
    "mean_cka",
    "regime",
    "headline",
)


def summary_row(run: dict) -> dict:
    """One run's row: the demo's keys (SUMMARY_KEYS; scores in the verdict's metric, the
    advantage over the control on the look the regime rests on, with its bounds and Holm
    p-value), its label, both looks' advantages and per bit width the quantized forget
    scores of the unlearned model and its references, and whether it recovered beyond the
    control's gain (None: not judged, no control)."""
    v = run["verdict"]
    e = v["evidence"]
    look = v["looks"].get(v["deciding_look"] or "", {})
    return {
        "label": run["label"],
        "method": run["method"],
        "lr": run["lr"],
        "metric": v["metric"],
        "forget_original": e["forget_original"],
        "forget_unlearned": e["forget_unlearned"],
        "forget_relearned": e.get("forget_relearned"),
        "retain_original": e["retain_original"],
        "retain_unlearned": e["retain_unlearned"],
        "advantage": look.get("advantage"),
        "advantage_lower": look.get("lower"),
        "advantage_upper": look.get("upper"),
        "look": v["deciding_look"],
        "p": look.get("p_holm"),
        "mean_cka": mean_cka(run["metrics_unlearned"]),
        "regime": v["regime"],
        "headline": v["headline"],
        "mean_pca_distance": mean_over_layers(run["metrics_unlearned"], "pca_distance", "forget"),
        "fisher_ratio": mean_over_layers(run["metrics_unlearned"], "fisher_mean_ratio", "forget"),
        "fisher_ratio_model": mean_over_layers(
            run["metrics_unlearned"], "fisher_model_mean_ratio", "forget"
        ),
        **depth_summary(run["metrics_unlearned"]),
        "weight_change": mean_over_layers(run["metrics_unlearned"], "weight_change", "", False),
        **{
            f"{name}_{key}": x[key]
            for name, x in (v["looks"] | v.get("side_looks", {})).items()
            for key in ("advantage", "lower", "upper")
        },
        **{f"forget_q{bits}": em for bits, em in e.get("forget_quantized", {}).items()},
        **{  # quantization's references and whether the unlearned model gained beyond them
            f"forget_q{bits}_{model}": score
            for model in ("original", "control")
            for bits, score in e.get(f"forget_quantized_{model}", {}).items()
        },
        **{f"q{bits}_recovered": q["recovered"] for bits, q in v.get("quantization", {}).items()},
        **{
            f"q{bits}_excess{suffix}": (q["excess"] or {}).get(key)
            for bits, q in v.get("quantization", {}).items()
            for suffix, key in (
                ("", "mean"),
                ("_lower", "lower"),
                ("_upper", "upper"),
                ("_p", "p_holm"),
            )
        },
        "probe_advantage": _difference(e.get("probe_forget_unlearned"), e.get("probe_chance")),
        **splice_summary(run.get("splice")),
    }


def splice_summary(result: dict | None) -> dict[str, float | None]:
    """``splice_restored_top1`` with its interval: the share of the forgetting (forget-set
    gap between the original and the unlearned model, in the verdict's metric) that restoring
    the original's top block and head into the unlearned model undoes (splice.restored_share).
    Near 1: a shallow edit near the output; near 0: the edit sits deeper. None where the splice
    did not run or the unlearned model lost nothing to restore. ``splice_tied_head``: the head
    shares its matrix with the input embeddings, so the head spliced moves them too."""
    share = (result or {}).get("restored_top1") or {}
    return {
        f"splice_restored_top1{suffix}": share.get(key)
        for suffix, key in (("", "share"), ("_lower", "lower"), ("_upper", "upper"))
    } | {"splice_tied_head": (result or {}).get("tied_head")}


DEPTH_CURVES = {
    "depth_share": ("depth_share_weight", ""),
    "depth_share_untied": ("depth_share_weight_untied", ""),
    "depth_share_fisher": ("depth_share_fisher", "forget"),
    "depth_share_fisher_untied": ("depth_share_fisher_untied", "forget"),
}
"""A summary row's depth curves (metrics.depth, k = 0..L) by the metrics table's names."""


def depth_summary(rows: list[dict]) -> dict:
    """A run's depth shares for its summary row: each curve of DEPTH_CURVES as a list over
    k = 0..L (empty where not measured), its value at k = 1 (the last block plus the head) as
    ``<name>_top1`` (None where not measured), and the tied head/embedding matrix's share of
    the weight change (``tied_share``; 0 for an untied head)."""
    out: dict = {}
    for name, (metric, probe_set) in DEPTH_CURVES.items():
        curve = _by_layer(rows, metric, probe_set)
        out[name] = [curve[k] for k in sorted(curve)]
        out[f"{name}_top1"] = curve.get(1)
    out["tied_share"] = _metric(rows, "tied_share_weight", 0, "")
    return out


def _difference(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def mean_cka(rows: list[dict]) -> float:
    """Linear CKA on the forget set, averaged over the decoder blocks (embeddings excluded)."""
    return mean_over_layers(rows, "cka", "forget")


def _f(value) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(_f(v) for v in row) + " |" for row in rows]


def prediction_note(runs: list[dict]) -> str:
    """Whether mean CKA separated the reversible from the irreversible forgetting runs."""
    rev = [
        mean_cka(r["metrics_unlearned"])
        for r in runs
        if r["verdict"]["regime"].startswith("reversible")
    ]
    irr = [
        mean_cka(r["metrics_unlearned"])
        for r in runs
        if r["verdict"]["regime"].startswith(("irreversible", "cannot-relearn"))
    ]
    if not rev or not irr:
        return (
            "CKA's prediction cannot be checked here: the runs did not include both "
            "reversible and irreversible forgetting."
        )
    separated = min(rev) > max(irr)
    return (
        f"Mean CKA of reversible runs: {min(rev):.3f}-{max(rev):.3f}; of irreversible runs: "
        f"{min(irr):.3f}-{max(irr):.3f}. CKA {'did' if separated else 'did NOT'} separate "
        "them (every reversible run above every irreversible one)"
        + ("." if separated else ": do not read CKA alone as a verdict.")
    )


def markdown(audit: dict, runs: list[dict]) -> str:
    """The full report as Markdown."""
    out = [
        f"# Unlearning audit: {audit['name']}",
        "",
        f"- original checkpoint: `{audit['original']}`",
    ]
    if audit.get("unlearned"):
        out.append(f"- unlearned checkpoint: `{audit['unlearned']}`")
    out += [f"- {line}" for line in setup_lines(audit)]
    out += ["", "## Verdict", ""]
    header, rows = _verdict_table(runs, audit["metric"])
    out += _table(header, [[*row[:-1], f"**{row[-1]}**"] for row in rows])
    out += ["", "## Thresholds", ""]
    out += _table(*_threshold_table(audit["thresholds"], audit["metric"]))
    out += ["", "## Representation evidence", "", prediction_note(runs), ""]
    for r in runs:
        out += [f"### {r['label']}", "", *(f"- {reason}" for reason in r["verdict"]["reasons"]), ""]
        out += [SCORES_CAPTION, ""]
        out += _table(*_scores_table(r["scores"], audit["metric"]))
        out += ["", curve_caption(audit), ""]
        out += _table(*_curve_table(r["curves"], audit.get("control_curves") or {}))
        out += ["", "Per layer, original vs unlearned (forget set) and vs relearned:", ""]
        out += _table(*_layer_table(r))
        if depth := _depth_table(r["metrics_unlearned"]):
            out += ["", DEPTH_CAPTION, ""]
            out += _table(*depth)
        out.append("")
        if r.get("splice"):
            out += [splice_caption(r["splice"]), ""]
            out += _table(*_splice_table(r["splice"]))
            out.append("")
    return "\n".join(out)


def setup_lines(audit: dict) -> list[str]:
    """The audit's setup, one line each, near the top of the report: the data, budget and
    control; the verdict's metric and why; the prompt format; the held-out half; the
    precision; the Fisher."""
    return [
        f"forget domain: {audit['domain']}; relearning budget: {audit['budget']:g} x "
        f"|forget| examples; control: {audit['control'] or 'none'}",
        metric_line(audit["metric"], audit["thresholds"]["metric"]),
        f"prompt format the model saw: {format_name(audit['prompt_format'])}",
        heldout_line(audit["heldout"]),
        precision_line(audit.get("precision")),
        fisher_line(audit),
    ]


def fisher_line(audit: dict) -> str:
    """What the Fisher measured (its layers, the dtype it is stored in), and which models have
    none and why (its stage skipped or failed), then the model's Fisher where it was asked
    for; "off" without it; "not recorded" for reports that predate the line."""
    if "fisher" not in audit:
        return "Fisher: not recorded"
    fisher = audit["fisher"]
    if fisher is None:
        return "Fisher: off (--no-fisher)"
    layers = fisher["layers"]
    chosen = "every layer" if layers is None else "layers " + ", ".join(map(str, layers))
    line = (
        f"Fisher: diagonal empirical Fisher on the forget set, {chosen}, stored in "
        f"{fisher['stored_dtype'].removeprefix('torch.')}"
    )
    missing = "; ".join(f"{model}: {why}" for model, why in fisher["missing"].items())
    line = f"{line}; none for {missing}" if missing else line
    if fisher.get("model_samples"):
        line += (
            f"; beside it the model's Fisher (labels drawn from the model, "
            f"{fisher['model_samples']} per row), its summary stored"
        )
    return line


PRECISION_NAMES = {
    "fp32": "fp32",
    "bf16-mixed": "bf16-mixed (fp32 master weights and optimizer state, bf16 autocast)",
    "bf16": "pure bf16 (lossy: small updates round away)",
}


def precision_line(precision: dict | None) -> str:
    """How the models computed: the training stages' precision and the dtypes of the audited
    checkpoints, each evaluated in its own; "not recorded" for reports that predate it."""
    if precision is None:
        return "precision: not recorded"
    training = ", ".join(PRECISION_NAMES[p] for p in precision["training"])
    dtypes = ", ".join(d.removeprefix("torch.") for d in precision["dtypes"])
    return (
        f"precision: unlearning and relearning in {training}; checkpoints in {dtypes}, "
        "each evaluated in its own dtype"
    )


def metric_line(metric: str, setting: str) -> str:
    """The verdict's metric by name, and whether it was set or chosen automatically (``setting``
    auto: by the forget set's answer length, as evaluation.default_metric chooses)."""
    name = METRIC_NAMES[metric]
    if setting != "auto":
        return f"verdict metric: {name} (set by thresholds.metric)"
    length = (
        f"short (median at most {SHORT_ANSWER_WORDS} words)"
        if metric == "exact_match"
        else f"long (median over {SHORT_ANSWER_WORDS} words), so each right answer token counts"
    )
    return (
        f"verdict metric: {name}, chosen automatically (thresholds.metric auto) by answer "
        f"length: the forget set's answers are {length}"
    )


def format_name(prompt_format: str | None) -> str:
    """How the model saw each row: the tokenizer's chat template, or the template as a Python
    literal (on one line); "not recorded" for verdicts that predate the field."""
    if prompt_format is None:
        return "not recorded"
    if prompt_format == "chat":
        return "chat (the tokenizer's chat template)"
    return "template " + repr(prompt_format)


def heldout_line(heldout: str | None) -> str:
    """What the held-out look is, or why it is unavailable: ``heldout`` is None or the audit's
    sentence why."""
    if heldout is None:
        return "held-out = half B of the forget set's groups, relearned on half A"
    return f"held-out half: unavailable ({heldout})"


def curve_caption(audit: dict) -> str:
    """The caption of a run's recovery-curve table: its metric and the held-out half."""
    return f"Recovery curve in {METRIC_NAMES[audit['metric']]}; {heldout_line(audit['heldout'])}:"


SCORES_CAPTION = (
    "Every score, set means of the original and of the unlearned model (the verdict tests only "
    "its own metric, marked):"
)


def _scores_table(scores: dict, metric: str) -> tuple[list[str], list[list]]:
    """Each measured score's forget and retain means, original and unlearned; ``scores`` maps
    model to set to score to mean (tasks/report.py set_means)."""
    header = ["score", "forget original", "forget unlearned", "retain original", "retain unlearned"]
    cells = [(model, name) for name in ("forget", "retain") for model in ("original", "unlearned")]
    return header, [
        [
            METRIC_NAMES[k] + (" (verdict)" if k == metric else ""),
            *(two_decimals(scores[model][name].get(k)) for model, name in cells),
        ]
        for k in METRIC_NAMES
        if any(k in scores[model][name] for model, name in cells)
    ]


def _verdict_table(runs: list[dict], metric: str) -> tuple[list[str], list[list]]:
    """One row per run: the token-level evidence in the verdict's ``metric``, the advantage over
    the control with its interval on the deciding look, mean CKA and the regime (last)."""
    name = METRIC_NAMES[metric]
    header = [
        "run",
        f"forget {name}: orig / unl / relearned",
        f"retain {name}: orig / unl",
        "advantage [interval] (look)",
        "p (Holm)",
        "mean CKA",
        "regime",
    ]
    rows = []
    for r in runs:
        row = summary_row(r)
        rows.append(
            [
                r["label"],
                " / ".join(
                    two_decimals(row[k])
                    for k in ("forget_original", "forget_unlearned", "forget_relearned")
                ),
                f"{two_decimals(row['retain_original'])} / {two_decimals(row['retain_unlearned'])}",
                advantage_cell(row),
                format_p(row["p"]),
                row["mean_cka"],
                row["regime"],
            ]
        )
    return header, rows


def summary_cells(row: dict) -> dict[str, str]:
    """One summary row (summary_row's keys) as the cells of a table, formatted, led by the
    regime: what the Prefect verdict artifact shows, and the CLI's table in its own order
    (scores to two decimals, the advantage with its interval and look, p as format_p)."""
    cells = {"regime": row["regime"]}
    cells |= {"domain": row["domain"]} if "domain" in row else {}
    scores = ("forget_original", "forget_unlearned", "forget_relearned")
    return cells | {
        "run": row["label"],
        f"forget {METRIC_NAMES[row['metric']]} (orig/unl/rel)": " / ".join(
            two_decimals(row[k]) for k in scores
        ),
        "retain (orig/unl)": f"{two_decimals(row['retain_original'])} / "
        f"{two_decimals(row['retain_unlearned'])}",
        "advantage [interval] (look)": advantage_cell(row),
        "p": format_p(row["p"]),
        "mean CKA": f"{row['mean_cka']:.3f}",
        "headline": row["headline"],
    }


def advantage_cell(row: dict) -> str:
    """ "+0.21 [+0.12, +0.30] (heldout)", or n/a where no look was judged."""
    if row["advantage"] is None:
        return "n/a"
    return (
        f"{row['advantage']:+.2f} [{row['advantage_lower']:+.2f}, "
        f"{row['advantage_upper']:+.2f}] ({row['look']})"
    )


def two_decimals(value: float | None) -> str:
    """A score in a table: two decimals, or n/a where it was not measured."""
    return "n/a" if value is None else f"{value:.2f}"


def format_p(p: float | None) -> str:
    """A p-value in a table: three decimals, "<0.001" below that, "-" where none was tested."""
    if p is None:
        return "-"
    return f"{p:.3f}" if p >= 0.001 else "<0.001"


def _threshold_table(t: dict, metric: str) -> tuple[list[str], list[list]]:
    """The verdict's metric (resolved, "(auto)" where chosen automatically), thresholds and
    statistics, each with what it means."""
    chosen = METRIC_NAMES[metric] + (" (auto)" if t["metric"] == "auto" else "")
    return ["setting", "value", "meaning"], [
        ["metric", chosen, "the per-fact score every test uses"],
        ["forgotten", t["forgotten"], "share of the original's forget score that must be lost"],
        ["catastrophic", t["catastrophic"], "relative retain drop above which it is catastrophic"],
        ["control_margin", t["control_margin"], "reversible: lower bound on the advantage above"],
        [
            "equivalence_margin",
            t["equivalence_margin"],
            "irreversible: upper bound below, every look",
        ],
        ["capacity", t["capacity"], "cannot relearn: below this share of the control's score"],
        ["alpha", t["alpha"], "one-sided error rate of each bound and test (Holm over looks)"],
        ["resamples", t["resamples"], "cluster-bootstrap resamples over groups"],
    ]


def _curve_table(curves: dict, control: dict) -> tuple[list[str], list[list]]:
    """A run's recovery curve beside the control's, point by point."""
    header = ["step", "forget (seed range)", "held-out", "control forget", "control held-out"]
    return header, [
        [
            p["step"],
            f"{p['forget']:.2f} ({p['spread']['forget'][0]:.2f}-{p['spread']['forget'][1]:.2f})"
            if "spread" in p
            else p["forget"],
            _point(curves.get("forget-half"), i, "forget_b"),
            _point(control.get("forget"), i, "forget"),
            _point(control.get("forget-half"), i, "forget_b"),
        ]
        for i, p in enumerate(curves["forget"])
    ]


SPLICE_NOTE = (
    "Each score with its cluster-bootstrap interval over groups; k = 0: the models unspliced. "
    "The head is the final norm and the LM head; a head tied to the input embeddings moves the "
    "shared matrix with it."
)


def splice_caption(result: dict) -> str:
    """What the splice table of a run shows, with the restored share and its interval."""
    share = splice_summary(result)
    value = [share[f"splice_restored_top1{s}"] for s in ("", "_lower", "_upper")]
    restored = "n/a (nothing forgotten to restore)" if value[0] is None else _bracket(value)
    return (
        f"Causal layer test (splice), {METRIC_NAMES[result['metric']]}: the original with the "
        f"unlearned model's top k of {result['blocks']} blocks and head (a), and the unlearned "
        "model with the original's restored (b). Share of the forgetting restored by the top "
        f"block and head (splice_restored_top1): {restored}. {SPLICE_NOTE}"
    )


def _splice_table(result: dict) -> tuple[list[str], list[list]]:
    """One row per k: forget and retain scores with intervals of both directions."""
    by = {(r["direction"], r["k"]): r for r in result["rows"]}
    directions = (("a", "original+unlearned_top"), ("b", "unlearned+original_top"))
    header = ["k", *(f"{name} ({d})" for d, _ in directions for name in ("forget", "retain"))]

    def cell(score: dict) -> str:
        value = [score["score"], score["lower"], score["upper"]]
        return _bracket([math.nan if v is None else v for v in value])

    return header, [
        [
            k,
            *(
                cell(by[direction, k][name])
                for _, direction in directions
                for name in ("forget", "retain")
            ),
        ]
        for k in sorted({k for _, k in by})
    ]


def _layer_table(r: dict) -> tuple[list[str], list[list]]:
    """A run's per-layer representation metrics on the forget set."""
    header = [
        "layer",
        "CKA",
        "CKA debiased",
        "PCA sim",
        "PC1 shift (sd)",
        "weight change",
        "Fisher ratio",
        "Fisher ratio (model)",
        "Fisher-weighted dist",
        "CKA relearned",
        "probe orig / unl / rel (chance)",
    ]
    return header, [
        [
            layer,
            *(
                _metric(r["metrics_unlearned"], m, layer)
                for m in ("cka", "cka_debiased", "pca_similarity", "pca_shift_pc1_norm")
            ),
            _metric(r["metrics_unlearned"], "weight_change", layer, ""),
            _metric(r["metrics_unlearned"], "fisher_mean_ratio", layer),
            _metric(r["metrics_unlearned"], "fisher_model_mean_ratio", layer),
            _metric(r["metrics_unlearned"], "fisher_weighted_distance", layer),
            _metric(r["metrics_relearned"], "cka", layer),
            _probe_cell(r.get("probes") or {}, layer),
        ]
        for layer in sorted({x["layer"] for x in r["metrics_unlearned"]})
    ]


DEPTH_CAPTION = (
    "Where the edit sits: the share of the unlearned model's change from the original in the "
    "last k blocks plus the head (k = 0: the head alone), of the squared weight change and of "
    "the original-Fisher-weighted distance (forget set). A tied head/embedding matrix cannot be "
    "placed: it is counted as head, then left out of the whole, and its own share is given "
    "(its share counted as embeddings is the first column minus it)."
)


def _depth_table(rows: list[dict]) -> tuple[list[str], list[list]] | None:
    """A run's depth shares by k (metrics.depth), tied matrix counted as head and left out;
    None where the metrics table has none (a stored weight change, or an older table)."""
    curves = {name: _by_layer(rows, metric, ps) for name, (metric, ps) in DEPTH_CURVES.items()}
    if not curves["depth_share"]:
        return None
    tied = _metric(rows, "tied_share_weight", 0, "")
    header = [
        "last k blocks + head",
        "weight change share (tied as head)",
        "(tied left out)",
        "Fisher-weighted share (tied as head)",
        "(tied left out)",
    ]
    table = [[k, *(curves[n].get(k) for n in DEPTH_CURVES)] for k in sorted(curves["depth_share"])]
    table.append(["tied matrix's own share", tied, "", _metric(rows, "tied_share_fisher", 0), ""])
    return header, table


def _probe_cell(probes: dict[str, list[dict]], layer: int) -> str:
    """Probe accuracy on the forget questions of each model at a layer, and measured chance."""
    if not probes:
        return "n/a"
    acc = {m: _by_layer(rows, "probe_forget", None).get(layer) for m, rows in probes.items()}
    chance = _by_layer(probes["unlearned"], "probe_chance", None).get(layer)
    models = ("original", "unlearned", "relearned")
    return " / ".join(_f(acc.get(m)) for m in models) + f" ({_f(chance)})"


def _point(curve: list[dict] | None, i: int, key: str):
    return curve[i][key] if curve and i < len(curve) else None


def _metric(rows: list[dict], metric: str, layer: int, probe_set: str = "forget"):
    for r in rows:
        if r["metric"] == metric and r["layer"] == layer and r["probe_set"] == probe_set:
            return r["value"]
    return None


def study_statistics(rows: list[dict], thresholds: dict) -> list[dict]:
    """The study's metric-prediction statistics (study.predictors), computed once for both the
    Markdown and the HTML page."""
    return study.predictors(rows, thresholds["alpha"], min(thresholds["resamples"], 2000))


def study_markdown(rows: list[dict], thresholds: dict, found: list[dict] | None = None) -> str:
    """The study's table: the regime of every method under every setting in every domain."""
    out = ["# Unlearning study: methods x domains x settings", ""]
    header, table_rows = _study_table(rows)
    out += _table(header, [[*row[:-1], f"**{row[-1]}**"] for row in table_rows])
    out += [
        "",
        "Regimes: " + ", ".join(f"{k}: {v}" for k, v in sorted(_regime_counts(rows).items())),
        "",
        "Thresholds: " + ", ".join(f"{k} = {v}" for k, v in thresholds.items()),
        "",
        "## False discoveries",
        "",
        fdr_note(rows, thresholds["alpha"]),
        "",
        "## Does a representation metric predict reversibility?",
        "",
        PREDICTOR_NOTE,
        "",
    ]
    out += _table(*_predictor_table(found or study_statistics(rows, thresholds)))
    return "\n".join(out)


PREDICTOR_NOTE = (
    "Per domain, over the runs judged reversible or irreversible (cannot-relearn counted with "
    "the irreversible): AUROC of each metric for the "
    "reversible label (0.5 = no better than chance; below 0.5 = the metric is lower for "
    "reversible runs) and Spearman correlation with the advantage over the control, each with "
    "a bootstrap interval over runs. An interval that spans 0.5 (AUROC) or 0 (Spearman) says "
    "the runs cannot tell; n/a: fewer than 3 runs of a label (AUROC) or of all (Spearman)."
)


def fdr_note(rows: list[dict], alpha: float) -> str:
    """How many reversible calls survive Benjamini-Hochberg at false discovery rate alpha."""
    calls = study.false_discoveries(rows, alpha)
    reversible = [c for c in calls if c["regime"].startswith("reversible")]
    survive = [c for c in reversible if c["survives"]]
    lost = ", ".join(
        f"{c['label']} ({c['domain']}, q = {c['q']:.3f})" for c in reversible if not c["survives"]
    )
    return (
        f"{len(survive)} of {len(reversible)} reversible calls survive Benjamini-Hochberg at "
        f"false discovery rate {alpha:g} over the {sum(c['q'] is not None for c in calls)} "
        "runs tested" + (f"; not: {lost}." if lost else ".")
    )


def _predictor_table(found: list[dict]) -> tuple[list[str], list[list]]:
    header = ["domain", "metric", "runs (reversible)", "AUROC [interval]", "Spearman [interval]"]
    return header, [
        [
            p["domain"],
            p["metric"],
            f"{p['runs']} ({p['reversible']})",
            _bracket(p["auroc"]),
            _bracket(p["spearman"]),
        ]
        for p in found
    ]


def _bracket(value: list[float]) -> str:
    if any(math.isnan(v) for v in value):
        return "n/a"
    return f"{value[0]:.2f} [{value[1]:.2f}, {value[2]:.2f}]"


def _study_table(rows: list[dict]) -> tuple[list[str], list[list]]:
    """One row per study run, its scores in its verdict's metric (named), the regime last."""
    header = [
        "domain",
        "run",
        "seed",
        "metric",
        "forget orig / unl / rel",
        "retain orig / unl",
        "mean CKA",
        "advantage [interval] (look)",
        "p (Holm)",
        "forget 8-bit / 4-bit",
        "probe above chance",
        "regime",
    ]
    return header, [
        [
            r["domain"],
            r["label"],
            r.get("seed", ""),
            METRIC_NAMES[r["metric"]],
            f"{two_decimals(r['forget_original'])} / {two_decimals(r['forget_unlearned'])} / "
            f"{two_decimals(r['forget_relearned'])}",
            f"{two_decimals(r['retain_original'])} / {two_decimals(r['retain_unlearned'])}",
            r["mean_cka"],
            advantage_cell(r),
            format_p(r["p"]),
            f"{_f(r.get('forget_q8'))} / {_f(r.get('forget_q4'))}",
            r.get("probe_advantage"),
            r["regime"],
        ]
        for r in rows
    ]


def _regime_counts(rows: list[dict]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["regime"]] = counts.get(r["regime"], 0) + 1
    return counts


# -- HTML ---------------------------------------------------------------------------------------

CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1d1d1f;
       max-width: 1180px; margin: 24px auto; padding: 0 24px; }
h1 { font-size: 26px; margin-bottom: 4px; } h2 { margin-top: 36px; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 10px 0; font-size: 13.5px; }
th, td { border: 1px solid #d4d4d4; padding: 4px 9px; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.regime { font-weight: 600; }
figure { margin: 18px 0 30px; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 13.5px; color: #444; max-width: 900px; }
.note { background: #f7f7f2; border-left: 4px solid #b5b58a; padding: 8px 12px; }
.meta li { margin: 2px 0; } code { font-size: 13px; }
"""


def _cell(value) -> str:
    """A table cell, numbers right-aligned."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return f'<td class="num">{_f(value)}</td>'
    return f"<td>{escape(_f(value))}</td>"


def _regime_style(regime: str) -> str:
    """The background of a cell that shows ``regime``: a tint of the regime's colour."""
    from . import plots  # matplotlib: only where a page is drawn, not for a stored report's rows

    return f"background:{plots.tint(plots.REGIME_COLORS[regime], 0.45)}"


def _html_table(header: list[str], rows: list[list], regime_last: bool = False) -> str:
    """An HTML table; with ``regime_last``, the last column is a regime, shaded in its colour."""
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = []
    for row in rows:
        cells = [_cell(v) for v in (row[:-1] if regime_last else row)]
        if regime_last:
            style = _regime_style(row[-1])
            cells.append(f'<td class="regime" style="{style}">{escape(row[-1])}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _figure_html(title: str, caption: str, png: bytes) -> str:
    data = base64.b64encode(png).decode()
    return (
        f'<figure><img alt="{escape(title)}" src="data:image/png;base64,{data}">'
        f"<figcaption><b>{escape(title)}.</b> {escape(caption)}</figcaption></figure>"
    )


def _page(title: str, body: list[str]) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{escape(title)}</title><style>{CSS}</style></head>"
        "<body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def _by_layer(rows: list[dict], metric: str, probe_set: str | None = "forget") -> dict[int, float]:
    """One metric's value per layer; ``probe_set`` None for tables without that column."""
    return {
        r["layer"]: r["value"]
        for r in rows
        if r["metric"] == metric and (probe_set is None or r["probe_set"] == probe_set)
    }


def _subspace_k(rows: list[dict]) -> int | None:
    """k of the top-k subspace similarity in a metrics table (None: not measured)."""
    prefix = "pca_similarity_top"
    found = {int(r["metric"][len(prefix) :]) for r in rows if r["metric"].startswith(prefix)}
    return min(found) if found else None


def _heldout_caption(heldout: str | None) -> str:
    """The recovery figure's sentence on the held-out line, or why there is none."""
    if heldout is None:
        return (
            "The held-out line is half B while relearning on half A: recovery there can only "
            "come from knowledge still in the weights."
        )
    line = heldout_line(heldout)
    return f"{line[0].upper()}{line[1:]}."


def figures(audit: dict, runs: list[dict]) -> list[tuple[str, str, bytes]]:
    """The audit's figures as (title, caption, PNG); Fisher only where it was measured."""
    from . import plots

    if not runs:
        return []
    unl = {r["label"]: r["metrics_unlearned"] for r in runs}
    rel = {r["label"]: r["metrics_relearned"] for r in runs}

    def per_run(tables: dict[str, list[dict]], metric: str, probe_set: str = "forget") -> dict:
        return {label: _by_layer(rows, metric, probe_set) for label, rows in tables.items()}

    def shifts(tables: dict[str, list[dict]]) -> dict:
        out = {}
        for label, rows in tables.items():
            pc1, pc2 = _by_layer(rows, "pca_shift_pc1_norm"), _by_layer(rows, "pca_shift_pc2_norm")
            out[label] = {layer: (x, pc2.get(layer, math.nan)) for layer, x in pc1.items()}
        return out

    name = METRIC_NAMES[audit["metric"]]
    e0 = runs[0]["verdict"]["evidence"]["forget_original"]
    k = _subspace_k(runs[0]["metrics_unlearned"]) or 2
    out = [
        (
            "Recovery under relearning",
            f"Forget-set {name} at each relearning step, one panel per run, the mean over "
            f"relearning seeds with their range shaded. {_heldout_caption(audit['heldout'])} "
            "Dashed: the same relearning from a model that never learned the forget "
            "set. The verdict compares gains fact by fact (the candidate's minus the "
            "control's), with a bootstrap interval; levels alone decide nothing.",
            plots.recovery_curves(
                {r["label"]: r["curves"] for r in runs},
                audit.get("control_curves") or {},
                e0,
                name,
            ),
        ),
        (
            "CKA per layer",
            "Linear CKA between the original's and the candidate's forget-set activations "
            f"(mean-pooled residual stream). High CKA after unlearning with a collapse of {name} "
            "points to a shallow edit; it is evidence, not a verdict.",
            plots.cka_per_layer(per_run(unl, "cka"), per_run(rel, "cka")),
        ),
        (
            "PCA similarity per layer",
            "How well the unlearned model keeps the original's principal directions on the "
            "forget set (absolute cosines: a direction has no sign).",
            plots.pca_similarity_per_layer(
                per_run(unl, "pca_similarity"), per_run(unl, f"pca_similarity_top{k}"), k
            ),
        ),
        (
            "PCA shift per layer",
            "Shift of the forget set's centroid along the original's first two principal "
            "components, in the original's standard deviations along each, one point per layer: "
            "of the unlearned models (left) and of the same models after relearning (right).",
            plots.pca_shift_scatter(shifts(unl), shifts(rel)),
        ),
    ]
    if any(r["metric"] == "fisher_mean_ratio" for rows in unl.values() for r in rows):
        out.append(
            (
                "Fisher information per layer",
                "Diagonal empirical Fisher of the unlearned model on the forget set, and its "
                "mean relative to the original's. Above 1: the forget answers pull harder on "
                "that layer's weights than they did in the original (a high loss after ascent); "
                "below 1: they no longer shape the likelihood there.",
                plots.fisher_per_layer(
                    {
                        label: {q: _by_layer(rows, f"fisher_{q}") for q in ("q50", "q90", "q99")}
                        for label, rows in unl.items()
                    },
                    per_run(unl, "fisher_mean_ratio"),
                    _by_layer(runs[0]["metrics_unlearned"], "fisher_mean_original"),
                ),
            )
        )
    probed = {r["label"]: r["probes"] for r in runs if r.get("probes")}
    if probed:
        first = next(iter(probed.values()))
        out.append(
            (
                "Linear probe accuracy per layer",
                "A logistic-regression probe trained on the retain questions' activations "
                "decodes the forget questions' answers: knowledge the unlearned model cannot say "
                "but a probe still reads is hidden, not deleted. Dotted: each run's measured "
                "chance (probes on shuffled labels); dashed: the original model.",
                plots.probe_per_layer(
                    {k: _by_layer(v["unlearned"], "probe_forget", None) for k, v in probed.items()},
                    {k: _by_layer(v["relearned"], "probe_forget", None) for k, v in probed.items()},
                    _by_layer(first["original"], "probe_forget", None),
                    {k: _by_layer(v["unlearned"], "probe_chance", None) for k, v in probed.items()},
                ),
            )
        )
    out += [
        (
            f"Causal layer test (splice): {r['label']}",
            f"Forget and retain {name} of spliced models against k, the top blocks spliced with "
            "the head. Solid: the original with the unlearned model's top k; dashed: the "
            "unlearned model with the original's top k restored; dotted: each model unspliced. "
            "A dashed forget line that climbs to the original's at small k marks a shallow "
            f"edit near the output. {SPLICE_NOTE}",
            plots.splice_curves(r["splice"], name),
        )
        for r in runs
        if r.get("splice")
    ]
    if any(_by_layer(rows, "depth_share_weight", "") for rows in unl.values()):
        out.append(
            (
                "Where the edit sits",
                f"{DEPTH_CAPTION} Solid: the tied matrix counted as head; dashed: left out.",
                plots.depth_share(
                    {
                        what: {
                            label: (
                                _by_layer(rows, f"depth_share_{what}", probe_set),
                                _by_layer(rows, f"depth_share_{what}_untied", probe_set),
                            )
                            for label, rows in unl.items()
                        }
                        for what, probe_set in (("weight", ""), ("fisher", "forget"))
                    }
                ),
            )
        )
    out.append(
        (
            "Weight change per layer",
            "Relative change of each layer's weights: shows whether the edit is shallow and "
            "near the output.",
            plots.weight_change_per_layer(per_run(unl, "weight_change", "")),
        )
    )
    return out


def html(audit: dict, runs: list[dict]) -> str:
    """The full report as one self-contained HTML page (figures embedded as PNG, no links out)."""
    meta = [f"original checkpoint: <code>{escape(audit['original'])}</code>"]
    if audit.get("unlearned"):
        meta.append(f"unlearned checkpoint: <code>{escape(audit['unlearned'])}</code>")
    meta += [escape(line) for line in setup_lines(audit)]
    body = [
        f"<h1>Unlearning audit: {escape(audit['name'])}</h1>",
        '<ul class="meta">' + "".join(f"<li>{m}</li>" for m in meta) + "</ul>",
        "<h2>Verdict</h2>",
        _html_table(*_verdict_table(runs, audit["metric"]), regime_last=True),
        "<h2>Thresholds</h2>",
        _html_table(*_threshold_table(audit["thresholds"], audit["metric"])),
        "<h2>Representation evidence</h2>",
        f'<p class="note">{escape(prediction_note(runs))}</p>',
        "<h2>Figures</h2>",
        *(_figure_html(*f) for f in figures(audit, runs)),
        "<h2>Per run</h2>",
    ]
    for r in runs:
        reasons = "".join(f"<li>{escape(x)}</li>" for x in r["verdict"]["reasons"])
        body += [
            f"<h3>{escape(r['label'])}</h3><ul>{reasons}</ul>",
            f"<p>{escape(SCORES_CAPTION)}</p>",
            _html_table(*_scores_table(r["scores"], audit["metric"])),
            "<details><summary>Recovery curve and per-layer metrics</summary>",
            f"<p>{escape(curve_caption(audit))}</p>",
            _html_table(*_curve_table(r["curves"], audit.get("control_curves") or {})),
            "<p>Per layer, original vs unlearned (forget set) and vs relearned:</p>",
            _html_table(*_layer_table(r)),
            *(
                [f"<p>{escape(DEPTH_CAPTION)}</p>", _html_table(*depth)]
                if (depth := _depth_table(r["metrics_unlearned"]))
                else []
            ),
            "</details>",
        ]
        if r.get("splice"):
            body += [
                f"<p>{escape(splice_caption(r['splice']))}</p>",
                _html_table(*_splice_table(r["splice"])),
            ]
    return _page(f"Unlearning audit: {audit['name']}", body)


def _regime_grid(rows: list[dict]) -> str:
    """The paper's table: methods down, domains x settings (learning rates) across, each cell
    the regime in its colour with the forget score, in the run's metric, unlearned -> relearned."""
    domains = list(dict.fromkeys(r["domain"] for r in rows))
    columns = sorted(
        {(r["domain"], r["lr"]) for r in rows}, key=lambda c: (domains.index(c[0]), -(c[1] or 0))
    )
    methods = list(dict.fromkeys(r["method"] for r in rows))
    top = "".join(
        f'<th colspan="{sum(d == c[0] for c in columns)}">{escape(d)}</th>' for d in domains
    )
    second = "".join(f"<th>lr={_f(lr)}</th>" for _, lr in columns)
    body = []
    for method in methods:
        cells = []
        for domain, lr in columns:
            found = [r for r in rows if (r["method"], r["domain"], r["lr"]) == (method, domain, lr)]
            if not found:
                cells.append("<td></td>")
                continue
            text = "<br>".join(
                f"{escape(_grid_tag(x))}<b>{escape(x['regime'])}</b><br><small>forget "
                f"{escape(METRIC_NAMES[x['metric']])} {two_decimals(x['forget_unlearned'])} &rarr; "
                f"{two_decimals(x['forget_relearned'])}; {escape(advantage_cell(x))}</small>"
                for x in found
            )
            cells.append(f'<td style="{_regime_style(found[0]["regime"])}">{text}</td>')
        body.append(f"<tr><th>{escape(method)}</th>{''.join(cells)}</tr>")
    return (
        f'<table><thead><tr><th rowspan="2">method</th>{top}</tr><tr>{second}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table>"
    )


def _grid_tag(row: dict) -> str:
    """What tells apart the runs of one grid cell: their requests and seed (study rows)."""
    tags = [f"x{row['requests']}" if row.get("requests", 1) > 1 else ""]
    tags.append(f"seed {row['seed']}" if row.get("confirmation") else "")
    return " ".join(t for t in tags if t) + (": " if any(tags) else "")


def study_html(rows: list[dict], thresholds: dict, found: list[dict] | None = None) -> str:
    """The study as one self-contained HTML page: the regime grid, a scatter of mean CKA against
    recovery beyond the control by regime, and the full table."""
    from . import plots

    counts = ", ".join(f"{k}: {v}" for k, v in sorted(_regime_counts(rows).items()))
    body = [
        "<h1>Unlearning study: methods x domains x settings</h1>",
        "<h2>Regimes</h2>",
        _regime_grid(rows),
        f"<p>Regimes: {escape(counts)}. Thresholds: "
        + escape(", ".join(f"{k} = {v}" for k, v in thresholds.items()))
        + ".</p>",
    ]
    if rows:
        body.append(
            _figure_html(
                "Does CKA predict reversibility?",
                "Each run's mean CKA with the original against how far relearning brought it "
                "beyond the never-learned control; colour: regime, marker: domain. Runs "
                "without a control are left out.",
                plots.study_scatter(rows),
            )
        )
    body += [
        "<h2>False discoveries</h2>",
        f"<p>{escape(fdr_note(rows, thresholds['alpha']))}</p>",
        "<h2>Does a representation metric predict reversibility?</h2>",
        f"<p>{escape(PREDICTOR_NOTE)}</p>",
        _html_table(*_predictor_table(found or study_statistics(rows, thresholds))),
    ]
    body += ["<h2>All runs</h2>", _html_table(*_study_table(rows), regime_last=True)]
    return _page("Unlearning study", body)


# -- stored inputs and the rebuild --------------------------------------------------------------

REPORT_MD, REPORT_HTML, INPUTS = "report.md", "report.html", "report-inputs.json"
SUMMARY_JSON = "summary.json"
"""The summary rows (summary_row) of an audit's report artifact."""
STUDY_MD, STUDY_TABLE, STUDY_HTML = "study.md", "study.json", "study.html"
FINDINGS_MD = "findings.md"
"""The findings page of a study's artifact (unlearning_audit.findings)."""


def render(inputs: dict) -> dict[str, str]:
    """The report files (name -> text) from stored report inputs: the audit and its runs."""
    return {
        REPORT_MD: markdown(inputs["audit"], inputs["runs"]),
        REPORT_HTML: html(inputs["audit"], inputs["runs"]),
    }


def find_report(store: Store, key: str) -> ArtifactRef:
    """An audit's report artifact by its key (report/<digest>) or a unique prefix of the digest."""
    prefix = key.removeprefix("report/")
    found = [m for m in store.manifests("report") if m["key"].split("/", 1)[1].startswith(prefix)]
    if not found:
        raise ValueError(
            f"no report in {store.url} matches {key!r}; list them with "
            "`unlearning-audit ls --stage report`"
        )
    if len(found) > 1:
        listed = ", ".join(m["key"] for m in found[:5])
        raise ValueError(f"{key!r} matches {len(found)} reports ({listed}): give more of it")
    return ArtifactRef(key=found[0]["key"], hash=found[0]["hash"])


def rebuild(store: Store, key: str, folder: Path | None = None) -> dict[str, Path]:
    """Write an audit's report files into ``folder`` (default ./reports/<digest>) from the report
    inputs stored with it: verdicts, metrics tables and curves, no model. Returns the paths."""
    ref = find_report(store, key)
    if INPUTS not in store.manifest(ref.key)["files"]:
        raise ValueError(f"{ref.key} predates stored report inputs; rerun its audit to store them")
    inputs = store.read_json(ref, INPUTS)
    if any("looks" not in run["verdict"] or "scores" not in run for run in inputs["runs"]):
        raise ValueError(
            f"{ref.key} holds report inputs of an older version (no per-fact intervals, or no "
            "scores beside the verdict's); rerun its audit (stages whose code is unchanged are "
            "served from the store)"
        )
    folder = folder or Path("reports") / ref.key.split("/", 1)[1]
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, text in render(inputs).items():
        paths[name] = folder / name
        paths[name].write_text(text)
    return paths
