"""Report: summary numbers against hand / numpy computations, markdown tables, verdicts, PNGs."""

from __future__ import annotations

import copy
import itertools
import json
import math
import struct

import matplotlib.image as mpimg
import numpy as np
import pytest

from llora_jax.report import figures as report_figures
from llora_jax.report import summary as report

# Task and method names chosen so that nothing can depend on GLUE names.
TASKS = ["alpha", "beta", "gamma"]
METHODS = ["lora", "l_lora"]
SEEDS = ["0", "1"]
GRID = [-1.0, -0.5, 0.0, 0.5, 1.0]

# single[method][task] = (seed 0, seed 1) test scores of the primary metric.
SINGLE = {
    "lora": {"alpha": (0.80, 0.90), "beta": (0.60, 0.70), "gamma": (0.50, 0.50)},
    "l_lora": {"alpha": (0.70, 0.75), "beta": (0.65, 0.55), "gamma": (0.40, 0.60)},
}
SUBSETS = ["+".join(c) for n in (2, 3) for c in itertools.combinations(TASKS, n)]
FUSIONS = ["ties", "task_arithmetic"]  # task_arithmetic deliberately not first


def _fusion_value(m: str, f: str, k: str, s: str, kind: str) -> float:
    """Deterministic, distinct numbers per (method, fusion, subset, seed)."""
    base = {"avg_test": 0.5, "avg_normalized": 0.8}[kind]
    return (
        base
        + 0.03 * METHODS.index(m)
        + 0.02 * FUSIONS.index(f)
        + 0.011 * SUBSETS.index(k)
        + 0.007 * int(s) * (1 + SUBSETS.index(k) % 2)
    )


def _xi(m: str, pair: str, s: str) -> np.ndarray:
    g = np.asarray(GRID)
    shift = 0.1 * METHODS.index(m) + 0.05 * int(s) + 0.01 * len(pair)
    return np.abs(g[:, None]) * np.abs(g[None, :]) * 0.3 + shift


def _matrix(offdiag: float, n: int = 3) -> list[list[float]]:
    m = np.full((n, n), offdiag) + np.diag([1.0 - offdiag] * n)
    return m.tolist()


def make_results() -> dict:
    r = {
        "study": "synthetic",
        "backbone": "tiny-bert",
        "device": "cpu",
        "versions": {"jax": "0.0", "flax": "0.0"},
        "date": "2026-01-01",
        "command": "llora study --study=synthetic",
        "tasks": TASKS,
        "methods": METHODS,
        "seeds": [0, 1],
        # beta's test dict holds two metrics: the primary one must be picked.
        "primary_metric": {"alpha": "accuracy", "beta": "spearman", "gamma": "accuracy"},
    }
    r["single"] = {
        m: {
            t: {
                s: {
                    "val": {"accuracy": 0.0},
                    "test": {"spearman": v, "accuracy": -1.0} if t == "beta" else {"accuracy": v},
                }
                for s, v in zip(SEEDS, SINGLE[m][t])
            }
            for t in TASKS
        }
        for m in METHODS
    }
    r["fusion"] = {
        m: {
            f: {
                k: {
                    s: {
                        "hparams": {"lam": 0.3 + 0.1 * int(s), "k": 0.5},
                        "val": {},
                        "test": {},
                        "test_normalized": {},
                        "avg_test": _fusion_value(m, f, k, s, "avg_test"),
                        "avg_normalized": _fusion_value(m, f, k, s, "avg_normalized"),
                    }
                    for s in SEEDS
                }
                for k in SUBSETS
            }
            for f in FUSIONS
        }
        for m in METHODS
    }
    cos = {"lora": (0.30, 0.20), "l_lora": (0.10, 0.12)}
    r["cosine"] = {
        m: {
            s: {
                "tasks": TASKS,
                "matrix": _matrix(c),
                "mean_off_diagonal": c,
                "delta_w_matrix": _matrix(c / 2),
                "delta_w_mean_off_diagonal": c / 2,
            }
            for s, c in zip(SEEDS, cos[m])
        }
        for m in METHODS
    }
    r["isolation_overlap"] = {
        m: {s: {"tasks": TASKS, "p": 0.1, "matrix": _matrix(0.2)} for s in SEEDS} for m in METHODS
    }
    pairs = ["alpha+beta", "alpha+gamma"]
    r["disentanglement"] = {
        m: {
            p: {
                s: {
                    "grid": GRID,
                    "xi": _xi(m, p, s).tolist(),
                    "mean_xi": float(_xi(m, p, s).mean()),
                }
                for s in SEEDS
            }
            for p in pairs
        }
        for m in METHODS
    }
    r["timings"] = {"finetune": 1.5}
    return r


def _stat_ref(vals) -> tuple[float, float]:
    v = np.asarray(vals, np.float64)
    return float(v.mean()), float(v.std(ddof=1))


def _table(md: str, heading: str, index: int = 0) -> list[list[str]]:
    """The rows (cells) of the index-th markdown table after `heading`, header included."""
    lines = md[md.index(heading) :].splitlines()
    tables, cur = [], []
    for line in lines[1:]:
        if line.startswith("|"):
            cur.append([c.strip() for c in line.strip("|").split(" | ")])
        elif cur:
            tables.append(cur)
            cur = []
        if line.startswith("## ") and len(tables) > index:
            break
    if cur:
        tables.append(cur)
    t = tables[index]
    return [t[0]] + t[2:]  # drop the --- separator line


@pytest.fixture(scope="module")
def results() -> dict:
    return make_results()


@pytest.fixture(scope="module")
def summary(results) -> dict:
    return report.summarize(results)


@pytest.fixture(scope="module")
def written(results, tmp_path_factory):
    """(report.md path, out_dir) of the full synthetic study, written once for several tests."""
    out = tmp_path_factory.mktemp("report")
    return report.write_report(results, out), out


def test_single_numbers_match_hand_computation(summary):
    s = summary["single"]
    # lora alpha: 0.80, 0.90 -> mean 0.85, sample std 0.1/sqrt(2).
    assert s["lora"]["tasks"]["alpha"]["mean"] == pytest.approx(0.85)
    assert s["lora"]["tasks"]["alpha"]["std"] == pytest.approx(0.1 / math.sqrt(2))
    # The primary metric (spearman), not accuracy (-1), is used for beta.
    assert s["l_lora"]["tasks"]["beta"]["mean"] == pytest.approx(0.60)
    # Average: per seed over tasks -> lora (0.6333, 0.7), then over seeds.
    for m in METHODS:
        per_seed = [np.mean([SINGLE[m][t][i] for t in TASKS]) for i in range(2)]
        mean, std = _stat_ref(per_seed)
        assert s[m]["average"]["mean"] == pytest.approx(mean)
        assert s[m]["average"]["std"] == pytest.approx(std)
    assert s["lora"]["average"]["mean"] == pytest.approx((0.8 + 0.6 + 0.5 + 0.9 + 0.7 + 0.5) / 6)


def test_fusion_numbers_match_numpy(summary):
    for f, m, kind, key in itertools.product(
        FUSIONS, METHODS, ("absolute", "normalized"), ("avg_test", "avg_normalized")
    ):
        if (kind == "absolute") != (key == "avg_test"):
            continue
        for n in (2, 3):
            subsets = [k for k in SUBSETS if len(k.split("+")) == n]
            per_seed = [np.mean([_fusion_value(m, f, k, s, key) for k in subsets]) for s in SEEDS]
            mean, std = _stat_ref(per_seed)
            got = summary["fusion"][f][kind][m][str(n)]
            assert got["mean"] == pytest.approx(mean) and got["std"] == pytest.approx(std)
    e = summary["fusion"]["ties"]
    assert e["sizes"] == [2, 3] and e["full_subset"] == "alpha+beta+gamma"
    assert e["hparams_full"]["l_lora"]["1"] == {"lam": pytest.approx(0.4), "k": 0.5}
    # l_lora gets +0.03 everywhere and task_arithmetic +0.02: that is the best for every method.
    for m in METHODS:
        assert summary["best_fusion"][m]["fusion"] == "task_arithmetic"
        assert summary["best_fusion"][m]["size"] == 3


def test_cosine_disentanglement_numbers(summary):
    c = summary["cosine"]
    assert c["lora"]["param"]["mean"] == pytest.approx(0.25)
    assert c["lora"]["delta_w"]["mean"] == pytest.approx(0.125)
    assert c["l_lora"]["param"]["std"] == pytest.approx(_stat_ref([0.10, 0.12])[1])
    assert summary["isolation_overlap"]["lora"]["mean_off_diagonal"]["mean"] == pytest.approx(0.2)
    d = summary["disentanglement"]["l_lora"]
    ref = [
        np.mean([_xi("l_lora", p, s).mean() for p in ("alpha+beta", "alpha+gamma")]) for s in SEEDS
    ]
    assert d["mean"]["mean"] == pytest.approx(np.mean(ref))
    assert d["pairs"]["alpha+gamma"]["mean"] == pytest.approx(
        np.mean([_xi("l_lora", "alpha+gamma", s).mean() for s in SEEDS])
    )


def test_markdown_tables(summary, written):
    path, tmp_path = written
    assert path == tmp_path / "report.md"
    md = path.read_text()
    rows = _table(md, "## Single-task test scores")
    assert rows[0] == ["method", "alpha", "beta", "gamma", "average", "seeds"]
    lora = dict(zip(rows[0], rows[1]))
    assert lora["method"] == "lora" and lora["alpha"] == f"0.850 ± {0.1 / math.sqrt(2):.3f}"
    assert lora["gamma"] == "0.500 ± 0.000" and lora["seeds"] == "2"
    mean, std = _stat_ref([np.mean([SINGLE["lora"][t][i] for t in TASKS]) for i in range(2)])
    assert lora["average"] == f"{mean:.3f} ± {std:.3f}"
    # Normalized table of task_arithmetic (second table after its heading).
    rows = _table(md, "### task_arithmetic", index=1)
    assert rows[0] == ["method", "2 tasks", "3 tasks"]
    cells = ["l_lora"]
    for n in (2, 3):
        subsets = [k for k in SUBSETS if len(k.split("+")) == n]
        per_seed = [
            np.mean(
                [
                    _fusion_value("l_lora", "task_arithmetic", k, s, "avg_normalized")
                    for k in subsets
                ]
            )
            for s in SEEDS
        ]
        cells.append(report_fmt(*_stat_ref(per_seed)))
    assert rows[2] == cells
    rows = _table(md, "### Best fusion per method")
    assert [r[:2] for r in rows[1:]] == [["lora", "task_arithmetic"], ["l_lora", "task_arithmetic"]]
    rows = _table(md, "### Cosine similarity")
    assert rows[1][:3] == ["lora", "0.2500 ± 0.0707", "0.1250 ± 0.0354"]
    rows = _table(md, "## Disentanglement error")
    assert rows[0] == ["method", "alpha+beta", "alpha+gamma", "mean"]
    # Hyper-parameters for the full task set are shown per seed.
    assert "lam=0.3, k=0.5" in md and "lam=0.4, k=0.5" in md
    # Every figure linked from the report exists.
    for name in _linked_images(md):
        assert (tmp_path / name).is_file(), name
    assert json.loads((tmp_path / "results_summary.json").read_text()) == json.loads(
        json.dumps(summary)
    )


def report_fmt(mean: float, std: float) -> str:
    return f"{mean:.3f} ± {std:.3f}"


def _linked_images(md: str) -> list[str]:
    import re

    return re.findall(r"!\[[^\]]*\]\(<([^>]+)>\)", md)


def _with(results: dict, **changes) -> dict:
    r = copy.deepcopy(results)
    for k, v in changes.items():
        if v is None:
            r.pop(k, None)
        else:
            r[k] = v
    return r


def _set_cos(r: dict, method: str, value: float) -> dict:
    for e in r["cosine"][method].values():
        e["mean_off_diagonal"] = value
    return r


def test_verdicts_default_case(summary):
    v = summary["verdicts"]
    assert v["cosine"]["verdict"] == "holds"  # l_lora 0.11 < lora 0.25
    assert v["cosine_delta_w"]["verdict"] == "holds"
    assert v["fusion_normalized"]["verdict"] == "holds"  # +0.03 for l_lora
    assert v["fusion_normalized"]["fusion"] == "task_arithmetic"
    assert v["disentanglement"]["verdict"] == "does not hold"  # xi shifted up by 0.1 for l_lora


def test_verdicts_constructed_cases(results):
    r = _set_cos(copy.deepcopy(results), "l_lora", 0.9)
    v = report.summarize(r)["verdicts"]
    assert v["cosine"]["verdict"] == "does not hold"
    assert v["cosine"]["l_lora"]["mean"] == pytest.approx(0.9)
    # Equal means: "lower" does not hold.
    r = _set_cos(_set_cos(copy.deepcopy(results), "l_lora", 0.2), "lora", 0.2)
    assert report.summarize(r)["verdicts"]["cosine"]["verdict"] == "does not hold"
    # A difference inside the seed spread is inconclusive, whichever way it leans.
    r = copy.deepcopy(results)
    for i, e in enumerate(r["cosine"]["lora"].values()):
        e["mean_off_diagonal"] = 0.2 + 0.1 * (-1) ** i  # std ≈ 0.1 over the seeds
    _set_cos(r, "l_lora", 0.19)
    v = report.summarize(r)["verdicts"]["cosine"]
    assert v["verdict"] == "inconclusive" and "leans" in v["detail"], v
    # ΔW missing (null) for one method -> not measured, the flattened verdict still holds.
    r = copy.deepcopy(results)
    for e in r["cosine"]["lora"].values():
        e["delta_w_matrix"] = e["delta_w_mean_off_diagonal"] = None
    v = report.summarize(r)["verdicts"]
    assert v["cosine_delta_w"]["verdict"] == "not measured" and v["cosine"]["verdict"] == "holds"
    # Disentanglement: make l_lora's xi lower.
    r = copy.deepcopy(results)
    for pairs in r["disentanglement"]["l_lora"].values():
        for e in pairs.values():
            e["mean_xi"] -= 0.5
    assert report.summarize(r)["verdicts"]["disentanglement"]["verdict"] == "holds"
    # Fusion: task_arithmetic is preferred; with it removed the first present (ties) is used.
    r = copy.deepcopy(results)
    for f in r["fusion"]["l_lora"]["task_arithmetic"].values():
        for e in f.values():
            e["avg_normalized"] = 0.1
    v = report.summarize(r)["verdicts"]["fusion_normalized"]
    assert v["verdict"] == "does not hold" and v["fusion"] == "task_arithmetic"
    for m in METHODS:
        del r["fusion"][m]["task_arithmetic"]
    v = report.summarize(r)["verdicts"]["fusion_normalized"]
    assert v["verdict"] == "holds" and v["fusion"] == "ties"
    # No l_lora at all -> everything is "not measured".
    r = copy.deepcopy(results)
    for sec in report.SECTIONS:
        r[sec].pop("l_lora")
    s = report.summarize(r)
    assert {x["verdict"] for x in s["verdicts"].values()} == {"not measured"}
    md = report.render_markdown(s)
    assert md.count("**not measured**") == 4


def test_missing_sections_render(results, tmp_path):
    # A quick demo: one seed, single-task scores and one fusion method only.
    r = _with(results, cosine=None, isolation_overlap=None, disentanglement=None, timings=None)
    r["single"] = {m: {t: {"0": v["0"]} for t, v in d.items()} for m, d in r["single"].items()}
    r["fusion"] = {m: {"ties": d["ties"]} for m, d in r["fusion"].items()}
    md = report.write_report(r, tmp_path / "demo").read_text()
    lora = _table(md, "## Single-task test scores")[1]
    assert lora[:4] == ["lora", "0.800", "0.600", "0.500"]  # one seed: no std
    assert "_Not measured: results.json has no `cosine` section._" in md
    assert "_Not measured: results.json has no `disentanglement` section._" in md
    assert "- `isolation_overlap`" in md and "## Timings" not in md
    v = report.summarize(r)["verdicts"]
    assert v["cosine"]["verdict"] == v["disentanglement"]["verdict"] == "not measured"
    assert v["fusion_normalized"]["fusion"] == "ties"
    assert not list((tmp_path / "demo").glob("disentangle_*.png"))
    # Nothing but a name; and a method/task the lists do not mention.
    md = report.write_report({"study": "empty"}, tmp_path / "empty").read_text()
    assert "# Study report: empty" in md and md.count("_Not measured") >= 3
    r = _with(results, methods=["lora"], tasks=["alpha"])
    s = report.summarize(r)
    assert s["methods"] == ["lora", "l_lora"] and s["tasks"] == TASKS


def test_pngs_valid(written):
    _, tmp_path = written
    names = sorted(p.name for p in tmp_path.glob("*.png"))
    expected = {
        "disentangle_lora_alpha+beta.png": report_figures.HEATMAP_SIZE,
        "disentangle_l_lora_alpha+gamma.png": report_figures.HEATMAP_SIZE,
        "cosine_lora.png": (
            2 * report_figures.MATRIX_PANEL_SIZE[0],
            report_figures.MATRIX_PANEL_SIZE[1],
        ),
        "isolation_l_lora.png": report_figures.MATRIX_PANEL_SIZE,
        "score_vs_tasks_ties.png": report_figures.LINE_SIZE,
        "score_vs_tasks_task_arithmetic.png": report_figures.LINE_SIZE,
    }
    assert set(expected) <= set(names) and len(names) == 4 + 2 + 2 + 2
    for name, (w_in, h_in) in expected.items():
        raw = (tmp_path / name).read_bytes()
        assert raw[:8] == b"\x89PNG\r\n\x1a\n" and raw[12:16] == b"IHDR"
        w, h = struct.unpack(">II", raw[16:24])
        assert (w, h) == (round(w_in * report_figures.DPI), round(h_in * report_figures.DPI))
        img = mpimg.imread(tmp_path / name)
        assert img.shape == (h, w, 4)
        assert img[..., :3].std() > 0.05  # something was drawn


def test_mean_xi_averages_seeds_and_checks_shape(results):
    by_seed = results["disentanglement"]["lora"]["alpha+beta"]
    grid, xi, n = report_figures.mean_xi(by_seed, "x")
    np.testing.assert_allclose(
        xi, (_xi("lora", "alpha+beta", "0") + _xi("lora", "alpha+beta", "1")) / 2
    )
    assert n == 2 and grid.tolist() == GRID
    bad = {"0": {"grid": GRID, "xi": [[0.0] * 5] * 4}}
    with pytest.raises(ValueError, match=r"shape \(4, 5\).*\(5, 5\)"):
        report_figures.mean_xi(bad, "disentanglement.lora.alpha+beta")


def test_mean_matrix_reorders_tasks():
    a = np.array([[1.0, 0.2, 0.3], [0.2, 1.0, 0.4], [0.3, 0.4, 1.0]])
    perm = [2, 0, 1]
    by_seed = {
        "0": {"tasks": TASKS, "matrix": a.tolist()},
        "1": {"tasks": [TASKS[i] for i in perm], "matrix": a[np.ix_(perm, perm)].tolist()},
    }
    tasks, m, n = report_figures.mean_matrix(by_seed, "matrix")
    assert tasks == TASKS and n == 2
    np.testing.assert_allclose(m, a)


def test_errors_are_clear(results, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        report.load_results(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json is not valid JSON"):
        report.load_results(tmp_path / "bad.json")
    (tmp_path / "ok.json").write_text(json.dumps(results))
    assert report.load_results(tmp_path / "ok.json") == json.loads(json.dumps(results))
    r = copy.deepcopy(results)
    r["primary_metric"]["beta"] = "f1"
    with pytest.raises(ValueError, match=r"lacks primary metric 'f1' of task 'beta'"):
        report.summarize(r)
    r = copy.deepcopy(results)
    r["cosine"] = [1, 2]
    with pytest.raises(ValueError, match="cosine must be an object"):
        report.summarize(r)


def test_study_timings_are_reported_without_the_fusion_split(results):
    """A study writes ``timings_s`` (fine-tuning, analysis blocks, and each fusion method):
    the report's timings table takes the first two and leaves the split in results.json."""
    timings = {
        "finetune/lora": 60.1,
        "analysis/lora/seed0": 112.0,
        "fusion/lora/seed0/ties": 18.0,
        "fusion/lora/seed0/ties/merging": 4.0,
    }
    r = _with(results, timings=None, timings_s=timings)
    s = report.summarize(r)
    assert s["timings"] == {"finetune/lora": 60.1, "analysis/lora/seed0": 112.0}
    md = report.render_markdown(s, {})
    assert _table(md, "## Timings")[1:] == [
        ["finetune/lora", "60.1"],
        ["analysis/lora/seed0", "112.0"],
    ]
