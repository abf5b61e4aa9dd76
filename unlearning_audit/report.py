"""The audit report: a summary row per unlearning run and a Markdown document, built from
stored tables alone (no model is loaded)."""

from __future__ import annotations

from .metrics.table import mean_over_layers

STUDY_KEYS_EXTRA = ("domain", "recovery_advantage")
SUMMARY_KEYS = (
    "method",
    "lr",
    "forget_acc_original",
    "forget_acc_unlearned",
    "forget_acc_relearned",
    "retain_acc_original",
    "retain_acc_unlearned",
    "mean_cka",
    "regime",
)


def summary_row(run: dict) -> dict:
    """One run's row: the demo's keys (SUMMARY_KEYS), its label and recovery advantages."""
    e = run["verdict"]["evidence"]
    return {
        "method": run["method"],
        "lr": run["lr"],
        "forget_acc_original": e["forget_original"],
        "forget_acc_unlearned": e["forget_unlearned"],
        "forget_acc_relearned": e["forget_relearned"],
        "retain_acc_original": e["retain_original"],
        "retain_acc_unlearned": e["retain_unlearned"],
        "mean_cka": mean_cka(run["metrics_unlearned"]),
        "regime": run["verdict"]["regime"],
        "label": run["label"],
        "recovery_advantage": run["verdict"]["recovery_advantage"],
        "heldout_advantage": run["verdict"]["heldout_advantage"],
    }


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
        if r["verdict"]["forgotten"] and r["verdict"]["reversible"]
    ]
    irr = [
        mean_cka(r["metrics_unlearned"])
        for r in runs
        if r["verdict"]["forgotten"] and not r["verdict"]["reversible"]
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
    t = audit["thresholds"]
    out = [
        f"# Unlearning audit: {audit['name']}",
        "",
        f"- original checkpoint: `{audit['original']}`",
    ]
    if audit.get("unlearned"):
        out.append(f"- unlearned checkpoint: `{audit['unlearned']}`")
    out += [
        f"- forget domain: {audit['domain']}; relearning budget: {audit['budget']:g} x "
        f"|forget| examples; control: {audit['control'] or 'none'}",
        "",
        "## Verdict",
        "",
    ]
    out += _table(
        [
            "run",
            "forget EM orig / unl / relearned",
            "retain EM orig / unl",
            "held-out relearned",
            "advantage vs control (forget / held-out)",
            "mean CKA",
            "regime",
        ],
        [
            [
                r["label"],
                "{:.2f} / {:.2f} / {:.2f}".format(
                    *(
                        r["verdict"]["evidence"][k]
                        for k in ("forget_original", "forget_unlearned", "forget_relearned")
                    )
                ),
                "{:.2f} / {:.2f}".format(
                    r["verdict"]["evidence"]["retain_original"],
                    r["verdict"]["evidence"]["retain_unlearned"],
                ),
                r["verdict"]["evidence"]["heldout_relearned"],
                " / ".join(
                    _f(r["verdict"][k]) for k in ("recovery_advantage", "heldout_advantage")
                ),
                mean_cka(r["metrics_unlearned"]),
                f"**{r['verdict']['regime']}**",
            ]
            for r in runs
        ],
    )
    out += ["", "## Thresholds", ""]
    out += _table(
        ["threshold", "value", "meaning"],
        [
            ["forgotten", t["forgotten"], "share of E(p0, forget) that must be lost"],
            [
                "catastrophic",
                t["catastrophic"],
                "relative retain drop above which it is catastrophic",
            ],
            ["reversible", t["reversible"], "share of E(p0, forget) relearning must restore"],
            ["control_margin", t["control_margin"], "recovery beyond the never-learned control"],
        ],
    )
    out += ["", "## Representation evidence", "", prediction_note(runs), ""]
    for r in runs:
        out += [f"### {r['label']}", "", *(f"- {reason}" for reason in r["verdict"]["reasons"]), ""]
        out += ["Recovery curve (exact match; held-out = half B, relearned on half A):", ""]
        curves = r["curves"]
        control = audit.get("control_curves") or {}
        out += _table(
            ["step", "forget", "held-out", "control forget", "control held-out"],
            [
                [
                    p["step"],
                    p["forget"],
                    _point(curves.get("forget-half"), i, "forget_b"),
                    _point(control.get("forget"), i, "forget"),
                    _point(control.get("forget-half"), i, "forget_b"),
                ]
                for i, p in enumerate(curves["forget"])
            ],
        )
        out += ["", "Per layer, original vs unlearned (forget set) and vs relearned:", ""]
        out += _table(
            [
                "layer",
                "CKA",
                "CKA debiased",
                "PCA sim",
                "PC1 shift (sd)",
                "weight change",
                "Fisher ratio",
                "Fisher-weighted dist",
                "CKA relearned",
            ],
            [
                [
                    layer,
                    *(
                        _metric(r["metrics_unlearned"], m, layer)
                        for m in ("cka", "cka_debiased", "pca_similarity", "pca_shift_pc1_norm")
                    ),
                    _metric(r["metrics_unlearned"], "weight_change", layer, ""),
                    _metric(r["metrics_unlearned"], "fisher_mean_ratio", layer),
                    _metric(r["metrics_unlearned"], "fisher_weighted_distance", layer),
                    _metric(r["metrics_relearned"], "cka", layer),
                ]
                for layer in sorted({x["layer"] for x in r["metrics_unlearned"]})
            ],
        )
        out.append("")
    return "\n".join(out)


def _point(curve: list[dict] | None, i: int, key: str):
    return curve[i][key] if curve and i < len(curve) else None


def _metric(rows: list[dict], metric: str, layer: int, probe_set: str = "forget"):
    for r in rows:
        if r["metric"] == metric and r["layer"] == layer and r["probe_set"] == probe_set:
            return r["value"]
    return None


def study_markdown(rows: list[dict], thresholds: dict) -> str:
    """The study's table: the regime of every method under every setting in every domain."""
    out = ["# Unlearning study: methods x domains x settings", ""]
    out += _table(
        ["domain", "run", "forget EM orig / unl / rel", "retain EM orig / unl", "mean CKA",
         "advantage vs control (forget / held-out)", "regime"],
        [[r["domain"], r["label"],
          f"{r['forget_acc_original']:.2f} / {r['forget_acc_unlearned']:.2f} / "
          f"{r['forget_acc_relearned']:.2f}",
          f"{r['retain_acc_original']:.2f} / {r['retain_acc_unlearned']:.2f}",
          r["mean_cka"], f"{_f(r['recovery_advantage'])} / {_f(r['heldout_advantage'])}",
          f"**{r['regime']}**"] for r in rows],
    )
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["regime"]] = counts.get(r["regime"], 0) + 1
    out += ["", "Regimes: " + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())), "",
            "Thresholds: " + ", ".join(f"{k} = {v}" for k, v in thresholds.items())]
    return "\n".join(out)
