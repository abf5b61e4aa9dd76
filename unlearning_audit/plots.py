"""The report's figures: plain functions, data in and PNG bytes out, in one figure style.

Figures are drawn on matplotlib's Agg canvas without pyplot, so no global figure state is kept
and nothing needs a display. Every figure is made under :data:`STYLE` and colours runs from
:data:`PALETTE` in the order given, so one run has one colour throughout a report. Regimes have
fixed colours (:data:`REGIME_COLORS`), shared with the report's tables.

Data shapes: a ``Series`` maps layer index to a value; a ``ByRun`` maps a run's label to its
series. Missing values may be NaN; they break a line instead of failing.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import matplotlib as mpl
from cycler import cycler
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_hex, to_rgb
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

Series = Mapping[int, float]
ByRun = Mapping[str, Series]

PALETTE = [
    "#0072b2",
    "#d55e00",
    "#009e73",
    "#cc79a7",
    "#e69f00",
    "#56b4e9",
    "#000000",
    "#999933",
]  # Okabe-Ito, colour-blind safe
REGIME_COLORS = {
    "reversible": "#e69f00",
    "irreversible": "#009e73",
    "reversible-catastrophic": "#d55e00",
    "irreversible-catastrophic": "#7b4ea3",
    "cannot-relearn": "#56b4e9",
    "cannot-relearn-catastrophic": "#0072b2",
    "inconclusive": "#f0e442",
    "inconclusive-catastrophic": "#cc79a7",
    "not-forgotten": "#8c8c8c",
}
STYLE = {
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.titleweight": "bold",
    "axes.labelsize": 10,
    "legend.fontsize": 8.5,
    "legend.framealpha": 0.9,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.prop_cycle": cycler(color=PALETTE),
    "lines.linewidth": 1.8,
    "lines.markersize": 5,
    "figure.facecolor": "white",
    "savefig.facecolor": "white",
    "figure.constrained_layout.use": True,
}
DPI = 110
PANEL_WIDTH, PANEL_HEIGHT = 4.6, 3.4  # inches: one panel of a figure, two to a row
SMALL_PANEL_WIDTH = 3.4  # inches: three to a row, as wide as two panels and a bit
LAYER_AXIS = "layer (0 = embeddings)"
PARAMETER_LAYER_AXIS = "layer (0 = embeddings, last = final norm and LM head)"


def tint(color: str, amount: float) -> str:
    """``color`` mixed with white (amount 0: white, 1: the colour), as hex: table cell shades."""
    return to_hex([1 - amount * (1 - c) for c in to_rgb(color)])


def run_colors(labels: Sequence[str]) -> dict[str, str]:
    """Each run's colour: the palette in the order the runs are given, cycled."""
    return {label: PALETTE[i % len(PALETTE)] for i, label in enumerate(labels)}


@contextmanager
def _figure(
    panels: int = 1, columns: int = 2, panel_width: float = PANEL_WIDTH
) -> Iterator[tuple[Figure, list[Axes]]]:
    """A figure of ``panels`` panels in rows of at most ``columns``, drawn under STYLE; at least
    two panels wide, so that a legend below has room."""
    columns = min(panels, columns)
    rows = math.ceil(panels / columns)
    with mpl.rc_context(STYLE):
        fig = Figure(figsize=(panel_width * max(columns, 2), PANEL_HEIGHT * rows))
        FigureCanvasAgg(fig)
        axes = list(fig.subplots(rows, columns, squeeze=False).flat)
        for extra in axes[panels:]:
            extra.set_visible(False)
        yield fig, axes[:panels]


def _png(fig: Figure) -> bytes:
    """The figure as PNG bytes (call inside its _figure block: the style applies when drawn)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def _line(ax: Axes, series: Series, **style) -> None:
    layers = sorted(series)
    ax.plot(layers, [series[layer] for layer in layers], **{"marker": "o", **style})


def _layer_axis(ax: Axes, layers: set[int], label: str = LAYER_AXIS) -> None:
    ax.set_xlabel(label)
    ax.set_xticks(sorted(layers))


def _layers(*groups: ByRun) -> set[int]:
    return {layer for group in groups for series in group.values() for layer in series}


def _legend_below(fig: Figure, handles: list, columns: int = 4) -> None:
    fig.legend(handles=handles, loc="outside lower center", ncols=min(columns, len(handles)))


def _run_handles(colors: Mapping[str, str]) -> list[Line2D]:
    return [Line2D([], [], color=c, marker="o", label=label) for label, c in colors.items()]


def _style_handles(styles: Mapping[str, dict]) -> list[Line2D]:
    return [Line2D([], [], label=name, **{"color": "0.3", **s}) for name, s in styles.items()]


def recovery_curves(
    curves: Mapping[str, Mapping[str, list[dict]]],
    control: Mapping[str, list[dict]],
    forget_original: float,
    score: str,
) -> bytes:
    """The forget set's ``score`` (the verdict's metric, by name) against relearning steps,
    one panel per run.

    ``curves`` maps run label to relearning source to its recovery curve (points with step,
    forget, forget_b); ``control`` holds the never-learned control's curves by source (may be
    empty). Solid: relearning the unlearned model; dashed: the control. The held-out line is half
    B while relearning on half A; a shaded band spans the relearning seeds (their mean is the
    line). Dotted: the original's ``score`` before unlearning.
    """
    lines = {  # (source, probe key): what the line shows, and its colour
        ("forget", "forget"): ("forget set (relearned on it)", PALETTE[0]),
        ("forget-half", "forget_b"): ("held-out half B (relearned on A)", PALETTE[1]),
    }
    with _figure(len(curves), columns=3, panel_width=SMALL_PANEL_WIDTH) as (fig, axes):
        for ax, (label, by_source) in zip(axes, curves.items(), strict=True):
            for (source, key), (_, color) in lines.items():
                for curve, dash in ((by_source.get(source), "-"), (control.get(source), "--")):
                    if curve:
                        steps = [p["step"] for p in curve]
                        ax.plot(steps, [p[key] for p in curve], dash, color=color, marker="o")
                        if "spread" in curve[0]:
                            low, high = zip(*(p["spread"][key] for p in curve), strict=True)
                            ax.fill_between(steps, low, high, color=color, alpha=0.15)
            ax.axhline(forget_original, color="0.2", linestyle=":", linewidth=1.2)
            ax.set(xlabel="relearning step", ylabel=score, ylim=(-0.03, 1.03))
            ax.set_title(label, fontsize="medium")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        handles = [Line2D([], [], color=c, marker="o", label=name) for name, c in lines.values()]
        handles += [
            Line2D([], [], color="0.3", linestyle="--", label="never-learned control")
            if control
            else Line2D([], [], color="none", label="(no never-learned control)"),
            Line2D([], [], color="0.2", linestyle=":", label="original (before unlearning)"),
        ]
        _legend_below(fig, handles, columns=3)
        return _png(fig)


def cka_per_layer(unlearned: ByRun, relearned: ByRun) -> bytes:
    """Linear CKA per layer against the original: of the unlearned models (left) and of the same
    models after relearning (right)."""
    colors = run_colors(list(unlearned))
    with _figure(2) as (fig, axes):
        pairs = {"unlearned": unlearned, "relearned": relearned}
        for ax, (what, data) in zip(axes, pairs.items(), strict=True):
            for label, series in data.items():
                _line(ax, series, color=colors[label])
            ax.set(
                title=f"Original vs {what}", ylabel="linear CKA (forget set)", ylim=(-0.03, 1.03)
            )
            _layer_axis(ax, _layers(unlearned, relearned))
        _legend_below(fig, _run_handles(colors))
        return _png(fig)


def pca_similarity_per_layer(pc1: ByRun, subspace: ByRun, k: int = 2) -> bytes:
    """PCA similarity per layer against the original: |cos| of the first principal directions,
    and the mean cosine of the principal angles of the top-``k`` subspaces."""
    colors = run_colors(list(pc1))
    with _figure(2) as (fig, axes):
        titles = ("First principal direction", f"Top-{k} principal subspace")
        ylabels = ("|cos(PC1 original, PC1 unlearned)|", "mean cos of principal angles")
        for ax, data, title, ylabel in zip(axes, (pc1, subspace), titles, ylabels, strict=True):
            for label, series in data.items():
                _line(ax, series, color=colors[label])
            ax.set(title=title, ylabel=ylabel, ylim=(-0.03, 1.03))
            _layer_axis(ax, _layers(pc1, subspace))
        _legend_below(fig, _run_handles(colors))
        return _png(fig)


def pca_shift_scatter(
    unlearned: Mapping[str, Mapping[int, tuple[float, float]]],
    relearned: Mapping[str, Mapping[int, tuple[float, float]]],
) -> bytes:
    """The paper's PCA-shift view: each layer's centroid shift (Delta-PC1, Delta-PC2) against the
    original, in units of the original's standard deviation along that component, for the
    unlearned models (left) and after relearning (right), on shared axes. Points are labelled
    by layer and joined in layer order."""
    colors = run_colors(list(unlearned))
    with _figure(2) as (fig, axes):
        fig.set_size_inches(PANEL_WIDTH * 2, PANEL_HEIGHT * 1.4)
        axes[1].sharex(axes[0])
        axes[1].sharey(axes[0])
        for ax, (what, data) in zip(
            axes, {"unlearned": unlearned, "relearned": relearned}.items(), strict=True
        ):
            ax.axhline(0, color="0.5", linewidth=0.8)
            ax.axvline(0, color="0.5", linewidth=0.8)
            for label, points in data.items():
                layers = sorted(points)
                xs, ys = [points[i][0] for i in layers], [points[i][1] for i in layers]
                ax.plot(xs, ys, color=colors[label], linewidth=0.8, alpha=0.6)
                ax.scatter(xs, ys, s=36, color=colors[label], zorder=3)
                for layer, x, y in zip(layers, xs, ys, strict=True):
                    ax.annotate(
                        f"L{layer}",
                        (x, y),
                        xytext=(4, 4),
                        textcoords="offset points",
                        fontsize=8,
                        color=colors[label],
                    )
            ax.set(
                title=f"Original vs {what} (L = layer)",
                xlabel="ΔPC1 (in sd of the original along PC1)",
                ylabel="ΔPC2 (in sd of the original along PC2)",
            )
        _legend_below(fig, _run_handles(colors))
        return _png(fig)


def fisher_per_layer(
    quantiles: Mapping[str, Mapping[str, Series]], ratio: ByRun, original_mean: Series
) -> bytes:
    """Diagonal Fisher on the forget set per layer: each run's quantiles (q50-q99 band, q90
    line) beside the original's mean, and each run's mean as a ratio to the original's."""
    colors = run_colors(list(ratio))
    with _figure(2) as (fig, axes):
        left, right = axes
        for label, color in colors.items():
            q = quantiles[label]
            layers = sorted(q["q50"])
            left.fill_between(
                layers,
                [q["q50"][i] for i in layers],
                [q["q99"][i] for i in layers],
                color=color,
                alpha=0.15,
                linewidth=0,
            )
            _line(left, q["q90"], color=color)
            _line(right, ratio[label], color=color)
        _line(left, original_mean, color="0.1", linestyle=":", marker="s")
        right.axhline(1.0, color="0.3", linestyle=":", linewidth=1.2)
        left.set(title="Fisher quantiles (band q50-q99, line q90)", ylabel="diagonal Fisher")
        right.set(title="Fisher mean relative to the original's", ylabel="ratio")
        for ax in axes:
            ax.set_yscale("log", nonpositive="mask")
            _layer_axis(ax, _layers(ratio, {"original": original_mean}), PARAMETER_LAYER_AXIS)
        styles = {"original's mean": {"linestyle": ":", "marker": "s", "color": "0.1"}}
        _legend_below(fig, _run_handles(colors) + _style_handles(styles))
        return _png(fig)


def probe_per_layer(unlearned: ByRun, relearned: ByRun, original: Series, chance: ByRun) -> bytes:
    """Linear-probe accuracy on the forget questions per layer: of the unlearned models (left)
    and after relearning (right), with the original's (dashed) and each run's measured chance
    (dotted, the permutation baseline)."""
    colors = run_colors(list(unlearned))
    styles = {"original": {"linestyle": "--", "color": "black"}, "chance": {"linestyle": ":"}}
    with _figure(2) as (fig, axes):
        for ax, (what, data) in zip(
            axes, {"unlearned": unlearned, "relearned": relearned}.items(), strict=True
        ):
            for label, series in data.items():
                _line(ax, series, color=colors[label])
                _line(ax, chance.get(label, {}), color=colors[label], marker="", **styles["chance"])
            _line(ax, original, marker="", **styles["original"])
            ax.set(
                title=f"Probe on the {what} models",
                ylabel="probe accuracy (forget set)",
                ylim=(-0.03, 1.03),
            )
            _layer_axis(ax, _layers(unlearned, relearned))
        _legend_below(fig, _run_handles(colors) + _style_handles(styles))
        return _png(fig)


def weight_change_per_layer(change: ByRun) -> bytes:
    """Relative weight change ||theta - theta0|| / ||theta0|| per layer, grouped bars per run."""
    colors = run_colors(list(change))
    layers = sorted(_layers(change))
    width = 0.8 / max(1, len(colors))
    with _figure(1) as (fig, axes):
        (ax,) = axes
        fig.set_size_inches(PANEL_WIDTH * 2, PANEL_HEIGHT)
        for i, (label, color) in enumerate(colors.items()):
            offset = (i - (len(colors) - 1) / 2) * width
            values = [change[label].get(layer, math.nan) for layer in layers]
            ax.bar([x + offset for x in layers], values, width=width, color=color, label=label)
        ax.set(title="Weight change per layer", ylabel="||θ − θ0|| / ||θ0||")
        _layer_axis(ax, set(layers), PARAMETER_LAYER_AXIS)
        _legend_below(fig, _run_handles(colors))
        return _png(fig)


def depth_share(shares: Mapping[str, Mapping[str, tuple[Series, Series]]]) -> bytes:
    """Share of a change in the last k blocks plus the head against k, one panel per measure
    (``shares`` maps "weight" (squared weight change) and "fisher" (Fisher-weighted distance)
    to run label to (tied matrix counted as head, left out), each a series over k); a measure
    with no run measured draws an empty panel."""
    colors = run_colors(list(shares["weight"]))
    titles = {"weight": "Squared weight change", "fisher": "Fisher-weighted distance"}
    styles = {
        "tied matrix as head": {"linestyle": "-"},
        "tied matrix left out": {"linestyle": "--"},
    }
    with _figure(len(shares)) as (fig, axes):
        for ax, (what, by_run) in zip(axes, shares.items(), strict=True):
            for label, (as_head, left_out) in by_run.items():
                _line(ax, as_head, color=colors[label])
                _line(ax, left_out, color=colors[label], marker="", linestyle="--")
            ax.set(title=titles[what], ylabel="share in last k blocks + head", ylim=(-0.03, 1.03))
            _layer_axis(
                ax, _layers({label: pair[0] for label, pair in by_run.items()}), "k (0 = head only)"
            )
        _legend_below(fig, _run_handles(colors) + _style_handles(styles))
        return _png(fig)


def study_scatter(rows: Sequence[Mapping]) -> bytes:
    """Mean CKA against recovery beyond the never-learned control (whole forget set and the
    held-out half), one point per run, coloured by regime, marker by domain."""
    markers = dict(zip(sorted({r["domain"] for r in rows}), "osD^vP*X", strict=False))
    with _figure(2) as (fig, axes):
        for ax, key, title in zip(
            axes,
            ("forget_advantage", "heldout_advantage"),
            ("Forget set", "Held-out half (relearned on the other)"),
            strict=True,
        ):
            for r in rows:
                if r.get(key) is not None:
                    ax.scatter(
                        r["mean_cka"],
                        r[key],
                        s=46,
                        marker=markers[r["domain"]],
                        color=REGIME_COLORS[r["regime"]],
                        edgecolors="0.2",
                        linewidths=0.6,
                    )
            ax.axhline(0, color="0.5", linewidth=0.8)
            ax.set(
                title=title,
                xlabel="mean CKA with the original (forget set)",
                ylabel="advantage over the control",
            )
        regimes = sorted({r["regime"] for r in rows}, key=list(REGIME_COLORS).index)
        handles = [
            Line2D([], [], color=REGIME_COLORS[g], marker="o", linestyle="none", label=g)
            for g in regimes
        ]
        handles += [
            Line2D([], [], color="0.3", marker=m, linestyle="none", label=d)
            for d, m in markers.items()
        ]
        _legend_below(fig, handles, columns=5)
        return _png(fig)


def splice_curves(result: Mapping, score: str) -> bytes:
    """The causal layer test of one run (the splice stage's result): each set's ``score`` (the
    verdict's metric, by name) against k, the top blocks spliced with the head, one panel per
    set (forget, retain). Solid: the original with the unlearned model's top k; dashed: the
    unlearned model with the original's top k restored; shaded: their intervals. Dotted lines:
    the original's and the unlearned model's own scores (k = 0)."""
    rows = result["rows"]
    directions = {  # direction: (legend, colour, line style)
        "original+unlearned_top": ("original + unlearned top k", PALETTE[1], "-"),
        "unlearned+original_top": ("unlearned + original top k", PALETTE[0], "--"),
    }
    references = {  # the unspliced model of each direction: (legend, colour)
        "original+unlearned_top": ("original", "0.2"),
        "unlearned+original_top": ("unlearned", PALETTE[3]),
    }
    sets = ("forget", "retain")
    with _figure(len(sets)) as (fig, axes):
        for ax, name in zip(axes, sets, strict=True):
            for direction, (_, color, dash) in directions.items():
                points = sorted(
                    (r for r in rows if r["direction"] == direction), key=lambda r: r["k"]
                )
                spliced = [r for r in points if r["k"] > 0 and r[name]["score"] is not None]
                ks = [r["k"] for r in spliced]
                ax.plot(ks, [r[name]["score"] for r in spliced], dash, color=color, marker="o")
                ax.fill_between(
                    ks,
                    [r[name]["lower"] for r in spliced],
                    [r[name]["upper"] for r in spliced],
                    color=color,
                    alpha=0.15,
                )
                unspliced = points[0][name]["score"] if points and points[0]["k"] == 0 else None
                if unspliced is not None:
                    ref_color = references[direction][1]
                    ax.axhline(unspliced, color=ref_color, linestyle=":", linewidth=1.2)
            ax.set(
                title=f"{name} set",
                xlabel="k (top blocks spliced, with the final norm and LM head)",
                ylabel=score,
                ylim=(-0.03, 1.03),
            )
            ax.set_xticks(sorted({r["k"] for r in rows if r["k"] > 0}))
        handles = [
            Line2D([], [], color=c, linestyle=dash, marker="o", label=label)
            for label, c, dash in directions.values()
        ]
        handles += [
            Line2D([], [], color=c, linestyle=":", label=f"{label} (unspliced)")
            for label, c in references.values()
        ]
        _legend_below(fig, handles)
        return _png(fig)
