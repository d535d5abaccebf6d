"""Reports: every file rendered, valid non-blank PNGs, table numbers equal results.csv, best-per-column
marks in the right direction, a self-contained HTML, and rendering without model files."""

from __future__ import annotations

import base64
import math
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib import image as mpimg

from bench.errors import BenchError
from bench.metrics.aggregate import paired_differences
from bench.run_folder import RunFolder, RunWriter
from reports.render import render_report, reproduce_command
from reports.tables import best_marks, direction
from tests.reports_fixture import make_run

ALL = ["md", "html", "latex"]
EXPECTED_PLOTS = {
    "embedding_plain",
    "embedding_diag_la",
    "embedding_mc_dropout",
    "uncertainty_diag_la",
    "uncertainty_mc_dropout",
    "reliability",
    "sparsification",
    "map_at_k",
    "timing",
    "findings_cost",
    "findings_ranks",
}


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    """One seed, 2-d embeddings, no seeds.csv/paired.csv, rendered in every format."""
    d = make_run(tmp_path_factory.mktemp("one"))
    return d, render_report(d, ALL)


@pytest.fixture(scope="module")
def rendered_seeds(tmp_path_factory):
    """Three seeds, 8-d embeddings (PCA), with paired.csv and no seeds.csv."""
    d = make_run(
        tmp_path_factory.mktemp("three"), seeds=(0, 1, 2), embed_dim=8, with_paired_csv=True, command=None
    )
    return d, render_report(d, ["md", "html"])


def parse_md_tables(md: str) -> list[tuple[str, list[str], list[list[str]]]]:
    """(bold title line above, headers, rows) of every pipe table in a markdown text."""
    out, lines, i = [], md.splitlines(), 0
    while i < len(lines):
        if lines[i].startswith("|") and i + 1 < len(lines) and set(lines[i + 1]) <= set("|-: "):
            title = next(
                (lines[j].strip("*") for j in range(i - 1, max(i - 4, -1), -1) if lines[j].startswith("**")),
                "",
            )
            split = lambda s: [c.strip() for c in s.strip().strip("|").split("|")]  # noqa: E731
            headers, rows, i = split(lines[i]), [], i + 2
            while i < len(lines) and lines[i].startswith("|"):
                rows.append(split(lines[i]))
                i += 1
            out.append((title, headers, rows))
        else:
            i += 1
    return out


CELL = re.compile(r"^(\*\*)?([-+]?\d+\.\d+)(?: \[([-+]?\d+\.\d+), ([-+]?\d+\.\d+)\])?(\*\*)?$")


def check_md_matches_csv(run_dir: Path) -> int:
    """Every per-seed cell equals results.csv at the printed precision, and every csv row is shown
    (per-score rows `<metric>:<score>`: those the score tables show, rows `method / score`)."""
    res = pd.read_csv(run_dir / "results.csv")
    md = (run_dir / "report.md").read_text()
    seen = set()
    for title, headers, rows in parse_md_tables(md):
        m = re.search(r"\(seed (\d+)\)$", title)
        if not m:
            continue
        seed = int(m.group(1))
        for row in rows:
            method, _, score = row[0].partition(" / ")
            for h, cell in zip(headers[1:], row[1:]):
                metric = h.rstrip(" ↑↓") + (f":{score}" if score else "")
                ref = res[(res["method"] == method) & (res["seed"] == seed) & (res["metric"] == metric)]
                assert len(ref) == 1, (method, seed, metric)
                ref = ref.iloc[0]
                if cell == "n/a":
                    assert math.isnan(ref["value"])
                else:
                    g = CELL.match(cell)
                    assert g, cell
                    # Python's round, as the report's format (numpy's rounds 0.8935 up: x * 1000 = 893.5)
                    assert float(g.group(2)) == pytest.approx(round(float(ref["value"]), 3), abs=1e-9), (
                        method,
                        metric,
                    )
                    assert float(g.group(3)) == pytest.approx(round(float(ref["ci_low"]), 3), abs=1e-9)
                    assert float(g.group(4)) == pytest.approx(round(float(ref["ci_high"]), 3), abs=1e-9)
                seen.add((method, seed, metric))
    headline = res[~res["metric"].str.contains(":", regex=False)]
    assert {k for k in seen if ":" not in k[2]} == set(
        zip(headline["method"], headline["seed"], headline["metric"])
    )
    return len(seen)


def test_render_creates_every_file(rendered):
    d, written = rendered
    assert written[:3] == [d / "report.md", d / "report.html", d / "report.tex"]
    assert {p.stem for p in (d / "plots").glob("*.png")} == EXPECTED_PLOTS
    md = (d / "report.md").read_text()
    for name in EXPECTED_PLOTS:
        assert f"(plots/{name}.png)" in md
    for section in (
        "## Findings",
        "## Details per criterion",
        "## Paired differences vs plain",
        "### Cost",
        "### Embeddings and their uncertainty",
        "### Reliability",
        "### Sparsification",
        "### Retrieval against K",
    ):
        assert section in md
    assert re.findall(r"^## .*$", md, re.M)[0] == "## Findings"  # the first section
    assert "`plain`: no uncertainty" in md  # plots needing uncertainty are skipped with a note
    assert "counted once" in md


def test_every_png_is_valid_and_not_blank(rendered):
    d, _ = rendered
    for f in (d / "plots").glob("*.png"):
        img = mpimg.imread(f)
        assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 300, f
        rgb = img[..., :3]
        assert rgb.std() > 0.05, f"{f.name} looks blank"
        assert (rgb.mean(axis=2) < 0.5).mean() > 0.002, f"{f.name} has almost no dark pixels"


@pytest.mark.parametrize("which", ["rendered", "rendered_seeds"])
def test_markdown_numbers_equal_results_csv(which, request):
    d, _ = request.getfixturevalue(which)
    assert check_md_matches_csv(d) > 0


def test_best_is_marked_in_the_right_direction(rendered):
    d, _ = rendered
    tables = parse_md_tables((d / "report.md").read_text())
    bold = {}
    for title, headers, rows in tables:
        if "(seed 0)" in title:
            for row in rows:
                for h, c in zip(headers[1:], row[1:]):
                    if c.startswith("**"):
                        bold.setdefault(h.rstrip(" ↑↓"), []).append(row[0])
    # fixture: mc_dropout has the higher AUROC/AUPR/var_ratio and the lower FPR95; diag_la the lower ECE/AUSE
    assert bold["AUROC[heldout]"] == ["mc_dropout"]
    assert bold["var_ratio[noise]"] == ["mc_dropout"]
    assert bold["FPR95[heldout]"] == ["mc_dropout"]
    assert bold["ECE"] == ["diag_la"] and bold["AUSE"] == ["diag_la"]
    res = pd.read_csv(d / "results.csv").query("seed == 0 and metric == 'mAP@1'")
    assert bold["mAP@1"] == [res.loc[res["value"].idxmax(), "method"]]


def test_best_marks_rules():
    assert direction("mAP@5") == 1 and direction("ECE") == -1 and direction("FPR95[mnist]") == -1
    assert direction("var_ratio[heldout]") == 1 and direction("something") is None
    assert best_marks({"a": 0.1, "b": 0.2}, "ECE") == {"a"}
    assert best_marks({"a": 0.1, "b": 0.2}, "AUROC[x]") == {"b"}
    assert best_marks({"a": 0.2001, "b": 0.2004, "c": 0.1}, "mAP@1") == {"a", "b"}  # tie at 3 decimals
    assert best_marks({"a": 0.5, "b": float("nan")}, "mAP@1") == set()  # one value: nothing to compare
    assert best_marks({"a": 0.5, "b": 0.7}, "unknown") == set()


def test_html_is_self_contained(rendered):
    d, _ = rendered
    text = (d / "report.html").read_text()
    srcs = re.findall(r"""\b(?:src|href)\s*=\s*['"]([^'"]*)""", text)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs), [
        s[:40] for s in srcs if not s.startswith("data:")
    ]
    rest = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", text).lower()
    assert "url(" not in rest and "@import" not in rest and "http" not in rest and "<link" not in rest
    embedded = {base64.b64decode(s.split(",", 1)[1]) for s in srcs}
    on_disk = {f.read_bytes() for f in (d / "plots").glob("*.png")}
    assert embedded == on_disk


def test_several_seeds_pca_and_paired_csv(rendered_seeds):
    d, _ = rendered_seeds
    md = (d / "report.md").read_text()
    assert "PCA projection of the 8-d embeddings" in md
    assert "(mean over seeds)" in md and "### Per seed" in md
    assert "**+0.050 [0.010, 0.090]**" in md  # paired.csv: CI excludes 0 -> bold
    assert "-0.010 [-0.050, 0.030]" in md and "**-0.010" not in md
    assert "interval across 3 seeds" in md and "stays in the metric's range" in md


def test_reproduce_command_rebuilt_when_not_recorded(rendered_seeds):
    from bench.cli import build_parser, config_from_args

    d, _ = rendered_seeds
    meta = RunFolder(d).meta
    cmd = reproduce_command(meta)
    assert cmd in (d / "report.md").read_text()
    assert cmd.startswith("python -m bench run --preset smoke") and "--seeds 0,1,2" in cmd
    cfg = config_from_args(build_parser().parse_args(cmd.split()[3:]))
    assert cfg.digest() == meta["config_digest"]


def test_paired_differences_from_per_query_vectors(tmp_path):
    d = make_run(tmp_path, methods={"plain": False, "diag_la": True, "mc_dropout": True})
    pq = RunFolder(d).all_perquery()
    assert list(pq) == [("plain", 0), ("diag_la", 0), ("mc_dropout", 0)]
    df = paired_differences(pq, "plain", n_resamples=500, seed=0)
    row = df[(df["method"] == "diag_la") & (df["metric"] == "mAP@1")].iloc[0]
    true = float(np.mean(pq[("diag_la", 0)]["pq_mAP@1"] - pq[("plain", 0)]["pq_mAP@1"]))
    assert row["diff"] == pytest.approx(true)
    assert row["ci_low"] < true < row["ci_high"]
    assert set(df["method"]) == {"diag_la", "mc_dropout"}
    render_report(d, ["md"])
    md = (d / "report.md").read_text()
    assert "differences computed here from the per-query vectors" in md
    assert f"{true:+.3f} [" in md


def test_plain_only_run_and_missing_reference(tmp_path):
    d = make_run(tmp_path / "a", methods={"plain": False})
    render_report(d, ["md"])
    md = (d / "report.md").read_text()
    assert {p.stem for p in (d / "plots").glob("*.png")} == {
        "embedding_plain",
        "map_at_k",
        "timing",
        "findings_cost",
    }
    assert "No reliability data for plain" in md and "No sparsification data for plain" in md
    d2 = make_run(tmp_path / "b", methods={"diag_la": True})
    render_report(d2, ["md"])
    assert "Not available: `plain` is not in this run." in (d2 / "report.md").read_text()


def test_stale_plots_removed_and_failures_listed(tmp_path):
    d = make_run(
        tmp_path,
        methods={"plain": False},
        failures=[{"method": "full_la", "seed": 0, "error": "out of memory", "traceback": ""}],
    )
    (d / "plots").mkdir()
    (d / "plots" / "embedding_gone.png").write_bytes(b"old")
    render_report(d, ["md"])
    assert not (d / "plots" / "embedding_gone.png").exists()
    assert "`full_la` (seed 0) failed: out of memory" in (d / "report.md").read_text()


def test_latex_report(rendered):
    d, _ = rendered
    tex = (d / "report.tex").read_text()
    assert tex.count(r"\begin{tabular}") == tex.count(r"\end{tabular}") >= 4
    assert (
        r"\textbf{" in tex
        and r"$\uparrow$" in tex
        and r"\includegraphics[width=\linewidth]{plots/timing.png}" in tex
    )
    assert "mAP@1" in tex and "var\\_ratio[heldout]" in tex
    if shutil.which("pdflatex"):
        r = subprocess.run(
            ["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "report.tex"],
            cwd=d,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == 0, r.stdout[-2000:]


def test_errors_are_one_line(tmp_path):
    with pytest.raises(BenchError, match="not a run folder"):
        render_report(tmp_path, ["md"])
    d = make_run(tmp_path / "x")
    with pytest.raises(BenchError, match="unknown report format 'pdf'"):
        render_report(d, ["pdf"])


def test_class_names_come_from_config_json_only(tmp_path):
    import json

    d = make_run(tmp_path)
    assert RunFolder(d).class_names()[9] == "Ankle boot"
    meta = json.loads((d / "config.json").read_text())
    del meta["class_names"]  # no fallback to the dataset module: legends then say `class k`
    RunWriter(d).write_config(meta, meta["status"])
    assert RunFolder(d).class_names() == []


def test_real_run_renders_without_model_files(tmp_path, cli):
    out = tmp_path / "runs"
    code, _, err = cli(
        "run",
        "--preset",
        "smoke",
        "--dataset",
        "synthetic",
        "--methods",
        "plain",
        "--out",
        str(out),
        "--no-report",
        "--quiet",
    )
    assert code == 0, err
    (d,) = [p for p in out.iterdir() if p.name != "cache"]
    shutil.rmtree(out / "cache" / "models")
    code, stdout, err = cli("report", str(d), "--format", "md,html,latex")
    assert code == 0, err
    assert "report.html" in stdout
    assert {p.stem for p in (d / "plots").glob("*.png")} == {
        "embedding_plain",
        "map_at_k",
        "timing",
        "findings_cost",
        "risk_coverage",
        "sparsification_scores",
    }  # plain: knn_disagreement
    res = pd.read_csv(d / "results.csv")
    assert (
        check_md_matches_csv(d) > (~res["metric"].str.contains(":", regex=False)).sum()
    )  # score cells shown too
    # run in-process, so no command was recorded: the report rebuilds one that gives the same config
    from bench.cli import build_parser, config_from_args

    meta = RunFolder(d).meta
    cmd = reproduce_command(meta)
    assert cmd in (d / "report.md").read_text() and "--dataset synthetic" in cmd and "--methods plain" in cmd
    assert config_from_args(build_parser().parse_args(cmd.split()[3:])).digest() == meta["config_digest"]


def test_run_where_every_method_failed(tmp_path):
    d = make_run(
        tmp_path,
        methods={"plain": False},
        all_failed=True,
        failures=[{"method": "plain", "seed": 0, "error": "boom", "traceback": ""}],
    )
    written = render_report(d, ALL)
    assert written == [d / "report.md", d / "report.html", d / "report.tex"]
    md = (d / "report.md").read_text()
    assert "No results: every method failed" in md and "`plain` (seed 0) failed: boom" in md


def test_far_ood_points_are_not_named_after_the_datasets_classes(tmp_path):
    """MNIST digits labelled 0-9 must not appear as 'OOD mnist: 0: T-shirt/top' in the legend."""
    from reports.plots import uncertainty_embedding_figure

    rng = np.random.default_rng(0)
    arrs = {
        "id_mean": rng.normal(size=(30, 2)),
        "id_labels": np.arange(30) % 3,
        "ood_heldout_mean": rng.normal(size=(6, 2)),
        "ood_heldout_labels": np.full(6, 7),
        "ood_mnist_mean": rng.normal(size=(9, 2)),
        "ood_mnist_labels": np.arange(9) % 3,
    }
    names = [f"c{i}" for i in range(10)]
    fig, _ = uncertainty_embedding_figure(arrs, {}, "m", names, "trace")
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels == ["c0", "c1", "c2", "OOD: heldout", "OOD: mnist"]


def test_with_base_column_follows_the_recorded_post_hoc_flag():
    """A post-hoc method that trains a head of its own (PFE) still shares the base training."""
    import pandas as pd

    from reports.tables import timing_table

    t = pd.DataFrame(
        [("base", 0, "train", 10.0), ("pfe", 0, "train", 2.0), ("hib", 0, "train", 7.0)],
        columns=["method", "seed", "stage", "seconds"],
    )
    rows = {r[0].text: r[-1].text for r in timing_table(t, ["pfe", "hib"], post_hoc={"pfe"}).rows}
    assert rows == {"base": "–", "pfe": "12.00", "hib": "–"}
    legacy = {r[0].text: r[-1].text for r in timing_table(t, ["pfe", "hib"]).rows}
    assert legacy["pfe"] == "–"  # folders without the flag: only methods that trained nothing get it


def test_seed_comparison_table_sits_beside_the_seeds_table1(tmp_path):
    """Rows K = 1, 3, 5, 7 with the seed's two columns and, per method (plain first), mAP_pml@K and
    mAP@K with their CIs; a run without mAP_pml@K has no such section."""
    import pandas as pd

    from bench.run_folder import RunFolder
    from reports.seed_comparison import SEED_TABLE1, seed_comparison_blocks, seed_comparison_table
    from tests.reports_fixture import make_run

    rows = [
        {
            "method": m,
            "metric": f"{stem}@{k}",
            "value": 0.5 + 0.01 * k + (0.1 if m == "plain" else 0),
            "lo": 0.4,
            "hi": 0.9,
        }
        for m in ("full_la", "plain")
        for stem in ("mAP_pml", "mAP")
        for k in (1, 3, 5, 7)
    ]
    t = seed_comparison_table(pd.DataFrame(rows), ["full_la", "plain"])
    assert [c.text for c in t.rows[0][:3]] == [
        "1",
        f"{SEED_TABLE1['ML without LA'][0]:.4f}",
        f"{SEED_TABLE1['ML with LA'][0]:.4f}",
    ]
    assert t.headers[3:] == ["plain mAP_pml@K", "plain mAP@K", "full_la mAP_pml@K", "full_la mAP@K"]
    assert t.rows[3][3].text == "0.670 [0.400, 0.900]" and t.rows[3][5].text == "0.570 [0.400, 0.900]"
    assert seed_comparison_table(pd.DataFrame(rows[:3]), ["full_la"]) is None
    assert seed_comparison_blocks(RunFolder(make_run(tmp_path))) == []
