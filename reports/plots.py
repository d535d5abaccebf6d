"""Report figures from a run's per-query arrays and tables, drawn on matplotlib's Agg canvas (no
pyplot, no display, no global state); each returns a `Figure`, or None when there is no data for it."""

from __future__ import annotations

import io
import re

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from bench.metrics.uncertainty import score_from_var

DPI = 120
# Okabe & Ito (2008) colour-blind-safe colours, plus three of Paul Tol's "muted" for classes 8-10;
# classes also differ by marker shape and methods by line style, so no figure relies on colour alone.
OKABE_ITO = ["#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7", "#000000"]
CLASS_COLOURS = OKABE_ITO[:7] + ["#882255", "#44AA99", "#999933"]
CLASS_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*", "p", "h"]
METHOD_COLOURS = [OKABE_ITO[i] for i in (4, 5, 2, 0, 6, 1, 7, 3)]
LINESTYLES = ["-", "--", "-.", ":"]
METHOD_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]
STAGE_COLOURS = {
    "train": "#0072B2",
    "hessian": "#D55E00",
    "prior": "#009E73",
    "predict": "#E69F00",
    "evaluate": "#CC79A7",
}
STAGE_HATCHES = {"train": "", "hessian": "//", "prior": "..", "predict": "\\\\", "evaluate": "xx"}
OOD_STYLES = [("#000000", "x"), ("#555555", "+"), ("#888888", "1"), ("#222222", "4")]


def method_style(i: int) -> dict:
    """Colour, line style and marker of the i-th method."""
    return {
        "color": METHOD_COLOURS[i % len(METHOD_COLOURS)],
        "linestyle": LINESTYLES[(i // len(METHOD_COLOURS)) % 4],
        "marker": METHOD_MARKERS[i % len(METHOD_MARKERS)],
    }


def class_style(c: int) -> tuple[str, str]:
    """(colour, marker) of class c."""
    return CLASS_COLOURS[c % len(CLASS_COLOURS)], CLASS_MARKERS[(c // 7) % len(CLASS_MARKERS)]


def png_bytes(fig: Figure, dpi: int = DPI) -> bytes:
    """The figure as PNG bytes at `dpi`, reduced to a 256-colour palette (plots use few colours; the
    palette makes each PNG about 3x smaller, which keeps report.html, where they are embedded, small)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from PIL import Image

    fig.set_dpi(dpi)  # fixed margins (subplots_adjust): a tight bbox would cost a second draw
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    rgb = np.asarray(canvas.buffer_rgba())[..., :3]
    out = io.BytesIO()
    palette = Image.fromarray(rgb).quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    palette.save(out, format="PNG", optimize=True)
    return out.getvalue()


def uncertainty(arrs: dict[str, np.ndarray], prefix: str) -> np.ndarray | None:
    """Per-point uncertainty score (tr Sigma) of `<prefix>_var`, or None when the method has none."""
    v = arrs.get(f"{prefix}_var")
    return None if v is None else score_from_var(v)


def ood_sets(arrs: dict[str, np.ndarray]) -> list[str]:
    """OOD set names present in a per-query file (`ood_<set>_mean`)."""
    return [m.group(1) for k in arrs if (m := re.fullmatch(r"ood_(.+)_mean", k))]


def project_2d(id_mean: np.ndarray, others: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray], str]:
    """(ID points, other points, axis note) in 2-d: unchanged for d = 2, the first two principal
    components (PCA fitted on the ID test embeddings, via SVD of the centred matrix) for d > 2, and
    the single coordinate against a zero axis for d = 1."""
    x = np.asarray(id_mean, np.float64).reshape(len(id_mean), -1)
    d = x.shape[1]
    if d == 2:
        return x, [np.asarray(o, np.float64) for o in others], "embedding dimensions 1 and 2"
    if d == 1:
        pad = lambda a: np.column_stack([np.asarray(a, np.float64).reshape(-1), np.zeros(len(a))])  # noqa: E731
        return pad(x), [pad(o) for o in others], "1-d embedding (vertical axis unused)"
    mu = x.mean(axis=0)
    _, s, vt = np.linalg.svd(x - mu, full_matrices=False)
    w = vt[:2].T
    explained = float((s[:2] ** 2).sum() / max((s**2).sum(), 1e-300))
    proj = lambda a: (np.asarray(a, np.float64).reshape(len(a), -1) - mu) @ w  # noqa: E731
    return (
        proj(x),
        [proj(o) for o in others],
        f"PCA projection of the {d}-d embeddings (PC1, PC2: {100 * explained:.0f}% of ID variance)",
    )


def roc_points(score_id: np.ndarray, score_ood: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """(FPR, TPR, AUROC) of detecting OOD (positive) by a higher uncertainty score."""
    from sklearn.metrics import roc_auc_score, roc_curve

    y = np.r_[np.zeros(len(score_id)), np.ones(len(score_ood))]
    s = np.r_[score_id, score_ood]
    fpr, tpr, _ = roc_curve(y, s)
    return fpr, tpr, float(roc_auc_score(y, s))


def uncertainty_figure(arrs: dict[str, np.ndarray], method: str, seed: int) -> Figure | None:
    """The seed's Fig 3 and OOD detection, three panels: (a) uncertainty per query, ID vs each OOD set
    (jittered strips with medians); (b) histograms of the uncertainty per set (fraction of each set per
    bin, so sets of different sizes compare); (c) ROC curves of OOD-vs-ID detection by uncertainty.
    None when the method has no uncertainty."""
    u_id = uncertainty(arrs, "id")
    if u_id is None:
        return None
    sets = [s for s in ood_sets(arrs) if uncertainty(arrs, f"ood_{s}") is not None]
    groups = [("ID test", u_id)] + [(f"OOD {s}", uncertainty(arrs, f"ood_{s}")) for s in sets]
    colours = ["#0072B2", "#D55E00", "#E69F00", "#CC79A7", "#009E73"]
    allv = np.concatenate([g for _, g in groups])
    logscale = bool(np.all(allv > 0)) and allv.max() / max(allv.min(), 1e-300) > 20
    fig = Figure(figsize=(15, 4.8))
    fig.subplots_adjust(left=0.06, right=0.985, top=0.86, bottom=0.12, wspace=0.25)
    a, b, c = fig.subplots(1, 3)
    rng = np.random.default_rng(0)  # jitter only
    for i, (_, u) in enumerate(groups):
        col = colours[i % len(colours)]
        a.scatter(
            i + rng.uniform(-0.3, 0.3, len(u)), u, s=6, alpha=0.5, color=col, linewidths=0, rasterized=True
        )
        a.plot([i - 0.38, i + 0.38], [np.median(u)] * 2, color="black", lw=2)
    a.set_xticks(range(len(groups)), [g for g, _ in groups])
    a.set_ylabel("uncertainty = sum of embedding variance")
    a.set_title("(a) uncertainty per query (bar: median)")
    if logscale:
        a.set_yscale("log")
        edges = np.geomspace(allv.min(), allv.max(), 41)
        b.set_xscale("log")
    else:
        edges = np.linspace(allv.min(), allv.max() if allv.max() > allv.min() else allv.min() + 1, 41)
    for i, (label, u) in enumerate(groups):
        b.hist(
            u,
            bins=edges,
            weights=np.full(len(u), 1.0 / len(u)),
            histtype="step",
            lw=1.8,
            color=colours[i % len(colours)],
            linestyle=LINESTYLES[i % 4],
            label=f"{label} (n={len(u)})",
        )
    b.set_xlabel("uncertainty" + (" (log bins)" if logscale else ""))
    b.set_ylabel("fraction of the set's queries per bin")
    b.set_title("(b) uncertainty histogram")
    b.legend(fontsize=8)
    c.plot([0, 1], [0, 1], color="grey", lw=1, linestyle=":", label="chance")
    for i, s in enumerate(sets, start=1):
        fpr, tpr, auc = roc_points(u_id, uncertainty(arrs, f"ood_{s}"))
        c.plot(
            fpr,
            tpr,
            color=colours[i % len(colours)],
            linestyle=LINESTYLES[i % 4],
            lw=1.8,
            label=f"{s} (AUROC {auc:.3f})",
        )
    c.set_xlabel("false positive rate (ID flagged as OOD)")
    c.set_ylabel("true positive rate (OOD flagged)")
    c.set_title("(c) OOD detection ROC")
    c.legend(fontsize=8, loc="lower right")
    for ax in (a, b, c):
        ax.grid(alpha=0.3)
    fig.suptitle(f"{method} (seed {seed}): uncertainty of ID vs OOD queries")
    return fig


def _grid(n: int, width: float = 4.0, height: float = 3.8, max_cols: int = 4) -> tuple[Figure, list]:
    cols = min(n, max_cols)
    rows = -(-n // cols)
    fig = Figure(figsize=(width * cols, height * rows))
    fig.subplots_adjust(
        left=0.8 / (width * cols),
        right=1 - 0.2 / (width * cols),
        bottom=0.6 / (height * rows),
        top=1 - 0.4 / (height * rows),
        wspace=0.3,
        hspace=0.45,
    )
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False).ravel())
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, list(axes[:n])


def reliability_figure(per_method: dict[str, dict[str, np.ndarray]], ece: dict[str, float]) -> Figure | None:
    """Reliability diagram per method from `extra_reliability_{conf,acc,count}` (equal-mass bins):
    mean correctness (precision@1) against mean confidence per bin, marker area ∝ bin count; the
    diagonal is perfect calibration, vertical lines show each bin's gap. None without data."""
    have = [
        m for m, a in per_method.items() if "extra_reliability_conf" in a and "extra_reliability_acc" in a
    ]
    if not have:
        return None
    fig, axes = _grid(len(have))
    for i, (m, ax) in enumerate(zip(have, axes)):
        a = per_method[m]
        conf = np.asarray(a["extra_reliability_conf"], float)
        acc = np.asarray(a["extra_reliability_acc"], float)
        cnt = np.asarray(a.get("extra_reliability_count", np.ones_like(conf)), float)
        ok = np.isfinite(conf) & np.isfinite(acc)
        st = method_style(list(per_method).index(m))
        ax.plot([0, 1], [0, 1], color="grey", linestyle=":", lw=1, label="perfect calibration")
        ax.vlines(
            conf[ok],
            np.minimum(conf[ok], acc[ok]),
            np.maximum(conf[ok], acc[ok]),
            color="#555555",
            lw=1.2,
            label="gap to diagonal",
        )
        ax.plot(conf[ok], acc[ok], color=st["color"], lw=1.2)
        size = 12 + 90 * cnt[ok] / max(cnt[ok].max(), 1) if ok.any() else 12
        ax.scatter(
            conf[ok],
            acc[ok],
            s=size,
            color=st["color"],
            marker=st["marker"],
            edgecolors="white",
            linewidths=0.5,
            zorder=3,
            label="bins (area ∝ count)",
        )
        e = ece.get(m, float("nan"))
        ax.set_title(f"{m}" + (f" (ECE {e:.3f})" if np.isfinite(e) else ""))
        ax.set_xlim(-0.02, 1.02)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("confidence (mean per bin)")
        if i % 4 == 0:
            ax.set_ylabel("precision@1 (mean per bin)")
        ax.grid(alpha=0.3)
        if i == 0:
            ax.legend(fontsize=7, loc="upper left")
    return fig


def sparsification_figure(
    per_method: dict[str, dict[str, np.ndarray]], ause: dict[str, float]
) -> Figure | None:
    """Sparsification curves of all methods on one axis: mAP@1 of the queries left after removing the
    most uncertain fraction (solid), the oracle that removes the worst queries first (dashed, same
    colour), and random removal (dotted) when recorded. None without data."""
    have = [
        m
        for m, a in per_method.items()
        if "extra_sparsification_curve" in a and "extra_sparsification_frac" in a
    ]
    if not have:
        return None
    fig = Figure(figsize=(10.5, 5.2))
    fig.subplots_adjust(left=0.08, right=0.7, top=0.92, bottom=0.11)
    ax = fig.add_subplot()
    for m in have:
        a = per_method[m]
        st = method_style(list(per_method).index(m))
        frac = np.asarray(a["extra_sparsification_frac"], float)
        e = ause.get(m, float("nan"))
        ax.plot(
            frac,
            a["extra_sparsification_curve"],
            color=st["color"],
            lw=2,
            marker=st["marker"],
            ms=4,
            label=f"{m}" + (f" (AUSE {e:.3f})" if np.isfinite(e) else ""),
        )
        if "extra_sparsification_oracle" in a:
            ax.plot(frac, a["extra_sparsification_oracle"], color=st["color"], lw=1.3, linestyle="--")
        if "extra_sparsification_random" in a:
            ax.plot(frac, a["extra_sparsification_random"], color=st["color"], lw=1, linestyle=":")
    handles, _ = ax.get_legend_handles_labels()
    handles += [
        Line2D([], [], color="black", lw=2, label="by uncertainty (solid)"),
        Line2D([], [], color="black", lw=1.3, linestyle="--", label="oracle (dashed)"),
    ]
    if any("extra_sparsification_random" in per_method[m] for m in have):
        handles.append(Line2D([], [], color="black", lw=1, linestyle=":", label="random (dotted)"))
    ax.legend(handles=handles, fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    ax.set_xlabel("fraction of queries removed (most uncertain first)")
    ax.set_ylabel("mAP@1 of the remaining queries")
    ax.set_title("Sparsification curves")
    ax.grid(alpha=0.3)
    return fig


def at_k_figure(summary: pd.DataFrame, methods: list[str], band: str) -> Figure | None:
    """mAP@K and Recall@K against K, all methods on one axis each, with their interval as a band.
    `summary` has columns method, metric, value, lo, hi. None when there is no @K metric."""
    fams = [f for f in ("mAP", "Recall") if summary["metric"].str.fullmatch(rf"{f}@\d+").any()]
    if not fams:
        return None
    fig = Figure(figsize=(6.2 * len(fams), 4.6))
    fig.subplots_adjust(left=0.09 / len(fams), right=0.98, top=0.91, bottom=0.12, wspace=0.22)
    axes = np.atleast_1d(fig.subplots(1, len(fams)))
    for ax, fam in zip(axes, fams):
        for i, m in enumerate(methods):
            d = summary[(summary["method"] == m) & summary["metric"].str.fullmatch(rf"{fam}@\d+")].copy()
            if d.empty:
                continue
            d["k"] = d["metric"].str.split("@").str[1].astype(int)
            d = d.sort_values("k")
            st = method_style(i)
            ax.plot(
                d["k"],
                d["value"],
                color=st["color"],
                linestyle=st["linestyle"],
                marker=st["marker"],
                lw=1.8,
                label=m,
            )
            if d["lo"].notna().any():
                ax.fill_between(d["k"], d["lo"], d["hi"], color=st["color"], alpha=0.18, linewidth=0)
        ax.set_xlabel("K")
        ax.set_ylabel(f"{fam}@K")
        ax.set_title(f"{fam}@K vs K (band: {band})")
        ax.set_xticks(
            sorted(
                summary["metric"][summary["metric"].str.fullmatch(rf"{fam}@\d+")]
                .str.split("@")
                .str[1]
                .astype(int)
                .unique()
            )
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return fig


def timing_figure(stages: pd.DataFrame) -> Figure | None:
    """Stacked bar: wall-time seconds per stage (stack) per method (bar), the shared base training as
    its own bar; totals printed above the bars. `stages`: methods x stages (reports.tables.stage_frame)."""
    if stages.empty:
        return None
    w = max(6.5, 1.1 * len(stages) + 3)
    fig = Figure(figsize=(w, 4.8))
    fig.subplots_adjust(left=0.8 / w, right=0.98, top=0.9, bottom=0.2)
    ax = fig.add_subplot()
    bottom = np.zeros(len(stages))
    x = np.arange(len(stages))
    extra = iter(OKABE_ITO[1:])
    for s in stages.columns:
        v = stages[s].to_numpy(float)
        ax.bar(
            x,
            v,
            bottom=bottom,
            color=STAGE_COLOURS.get(s) or next(extra, "#999999"),
            hatch=STAGE_HATCHES.get(s, ""),
            edgecolor="white",
            linewidth=0.5,
            label=s,
        )
        bottom += v
    for xi, t in zip(x, bottom):
        ax.text(xi, t, f"{t:.2f}s", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x, list(stages.index), rotation=20, ha="right")
    ax.set_ylabel("seconds (summed over seeds)")
    ax.set_title('Wall time per stage ("base": shared base training, counted once)')
    ax.legend(fontsize=8, title="stage")
    ax.grid(axis="y", alpha=0.3)
    ax.set_ylim(0, max(bottom.max() * 1.15, 1e-3))
    return fig


EMBED_POINTS = 2500  # at most this many points per query set in an embedding plot (a seeded subsample)


def _subsample(n: int, k: int, seed: int = 0) -> np.ndarray:
    return np.arange(n) if n <= k else np.sort(np.random.default_rng(seed).choice(n, k, replace=False))


def uncertainty_embedding_figure(
    arrs: dict[str, np.ndarray],
    scores: dict[str, dict[str, np.ndarray]],
    title: str,
    class_names: list[str],
    score_name: str,
) -> tuple[Figure, str]:
    """The seed's Fig. 3 for one mean embedding: the 2-d projection of the ID test queries and every OOD
    set together; the first panel coloured by class (OOD as crosses), then one panel per method that
    shares this mean, each point coloured by that method's uncertainty score (its percentile among
    the ID and OOD queries shown, so methods with different score scales compare) and sized by it.
    `scores`: method -> {query set (`id` or an OOD set): score vector}. Returns (figure, axis note)."""
    from matplotlib import cm, colors

    sets = ood_sets(arrs)
    id2, ood2, note = project_2d(arrs["id_mean"], [arrs[f"ood_{s}_mean"] for s in sets])
    pick = {"id": _subsample(len(id2), EMBED_POINTS)}
    pick |= {s: _subsample(len(p), EMBED_POINTS // 2, i + 1) for i, (s, p) in enumerate(zip(sets, ood2))}
    pts = {"id": id2} | dict(zip(sets, ood2))
    fig, axes = _grid(1 + len(scores), width=4.2, height=3.9, max_cols=3)
    ax = axes[0]
    y = np.asarray(arrs["id_labels"]).astype(int)[pick["id"]]
    p = id2[pick["id"]]
    for c in np.unique(y):
        col, mk = class_style(int(c))
        label = class_names[c] if 0 <= c < len(class_names) else f"class {c}"
        ax.scatter(
            p[y == c, 0],
            p[y == c, 1],
            s=5,
            c=col,
            marker=mk,
            alpha=0.7,
            linewidths=0,
            rasterized=True,
            label=label,
        )
    for i, s in enumerate(sets):
        colour, mk = OOD_STYLES[i % len(OOD_STYLES)]
        q = pts[s][pick[s]]
        ax.scatter(
            q[:, 0],
            q[:, 1],
            s=9,
            c=colour,
            marker=mk,
            alpha=0.45,
            linewidths=0.6,
            rasterized=True,
            label=f"OOD: {s}",
        )
    ax.set_title("by class; OOD as crosses", fontsize=9)
    ax.legend(fontsize=6, markerscale=1.5, loc="best", frameon=False, ncol=2)
    norm = colors.Normalize(0, 100)
    for ax, (m, sc) in zip(axes[1:], scores.items()):
        pooled = np.concatenate([sc[k][pick[k]] for k in pts if k in sc])
        for k, marker in [(k, "o" if k == "id" else "x") for k in pts]:
            if k not in sc:
                continue
            u = sc[k][pick[k]]
            pct = 100 * np.searchsorted(np.sort(pooled), u, side="right") / max(len(pooled), 1)
            q = pts[k][pick[k]]
            ax.scatter(
                q[:, 0],
                q[:, 1],
                c=pct,
                cmap="viridis",
                norm=norm,
                s=3 + 22 * pct / 100,
                marker=marker,
                alpha=0.7,
                linewidths=0.6 if marker == "x" else 0,
                rasterized=True,
            )
        ax.set_title(f"{m}: {score_name} (o ID, x OOD)", fontsize=9)
    if len(scores):
        fig.colorbar(
            cm.ScalarMappable(norm=norm, cmap="viridis"),
            ax=axes[1:],
            shrink=0.8,
            label="uncertainty percentile (ID + OOD shown)",
        )
    for ax in axes:
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    fig.subplots_adjust(top=1 - 0.75 / fig.get_figheight())
    fig.suptitle(title, fontsize=10, y=1 - 0.1 / fig.get_figheight(), va="top")
    return fig, note


def finish_panels(fig, axes, used: int) -> None:
    """Hide the unused panels of a grid of axes and draw one legend for the used ones (each label once),
    to the right of the panels."""
    for ax in axes[used:]:
        ax.set_visible(False)
    legend: dict = {}
    for ax in axes[:used]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(lab, h)
    fig.legend(
        list(legend.values()),
        list(legend),
        loc="center left",
        bbox_to_anchor=(0.83, 0.5),
        fontsize=8,
        frameon=False,
    )


def score_panel_grid(per_method: dict[str, dict[str, np.ndarray]], scores: list[str], top: float):
    """(figure, axes, scores) for one panel per uncertainty score that some method has an ID score
    vector and per-query correctness for (up to 3 panels a row, room on the right for one legend);
    None when no score has them."""
    from bench.conventions import CORRECTNESS_METRIC, ID_SET, score_arrays

    correct = f"pq_{CORRECTNESS_METRIC}"  # the per-query correctness vector of a per-query file
    panels = [
        s for s in scores if any((ID_SET, s) in score_arrays(a) and correct in a for a in per_method.values())
    ]
    if not panels:
        return None
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig = Figure(figsize=(5.0 * cols + 2.6, 3.9 * rows))
    fig.subplots_adjust(left=0.06, right=0.82, top=top, bottom=0.08, wspace=0.28, hspace=0.38)
    return fig, np.atleast_1d(fig.subplots(rows, cols)).ravel(), panels
