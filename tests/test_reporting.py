"""Comparable reports: families, compute table, paired differences, verdicts, markdown and plots."""

from __future__ import annotations

import json
import math
import sys
from typing import Any

import pytest

from prelort.reporting.markdown import summary_markdown
from prelort.reporting.plots import plot_summary
from prelort.reporting.statistics import t_quantile
from prelort.reporting.summary import method_family, paired_differences, summarise, verdict_table

T_DF2 = 4.302652729749462  # t_{0.975, 2}: three paired seeds

# values per seed, in the seed order of SEEDS[method]
ACC = {
    "prelort": {2: [0.70, 0.74, 0.72], 4: [0.80, 0.82, 0.81]},
    "segment": {2: [0.68, 0.70, 0.72], 4: [0.90, 0.93, 0.91]},
    "hetlora": {2: [0.60, 0.62, 0.61, 0.65], 4: [0.79, 0.80, 0.83, 0.50]},
    "flora": {2: [0.75, 0.76, 0.77], 4: [0.75, 0.76, 0.77]},
    "fedit-r2": {2: [0.90, 0.92], 4: [0.95, 0.96]},
}
LOSS = {
    "prelort": {2: [0.50, 0.40, 0.45], 4: [0.30, 0.32, 0.31]},
    "segment": {2: [0.55, 0.45, 0.45], 4: [0.33, 0.36, 0.32]},
    "hetlora": {2: [0.40, 0.30, 0.35, 0.10], 4: [0.35, 0.30, 0.40, 0.20]},
    "flora": {2: [0.42, 0.41, 0.40], 4: [0.42, 0.41, 0.40]},
    "fedit-r2": {2: [0.20, 0.22], 4: [0.10, 0.12]},
}
SEEDS = {
    "prelort": [0, 1, 2],
    "segment": [0, 1, 2],
    "hetlora": [0, 1, 2, 3],
    "flora": [0, 1, 2],
    "fedit-r2": [0, 1],
}
NEW_FORMAT = {"prelort", "flora", "fedit-r2"}  # these carry family/oracle_level/totals; others are old files


def _run(method: str, i: int, acc: dict[int, list[float]], loss: dict[int, list[float]]) -> dict[str, Any]:
    seed = SEEDS[method][i]
    per_rank = {str(lv): {"loss": loss[lv][i], "accuracy": acc[lv][i]} for lv in (2, 4)}
    early = {lv: {k: v + 0.05 for k, v in m.items()} for lv, m in per_rank.items()}
    r: dict[str, Any] = {
        "method": method,
        "seed": seed,
        "levels": [2, 4],
        "rounds": [
            {"round": 1, "per_rank": early, "bytes_up": 10, "bytes_down": 20, "passes": 5, "examples": 40},
            {"round": 2, "per_rank": per_rank, "bytes_up": 10, "bytes_down": 20, "passes": 7, "examples": 60},
        ],
        "final": {"per_rank": per_rank},
        "total_seconds": 1.5,
        "total_bytes_up": 100 + seed,
        "total_bytes_down": 300,
    }
    if method in NEW_FORMAT:
        r["family"] = {"prelort": "rank-limited", "flora": "merged", "fedit-r2": "homogeneous"}[method]
        if method == "fedit-r2":
            r["oracle_level"] = 2
        else:
            r["total_passes"] = 1000 + 10 * seed
            r["total_examples"] = 5000
    return r


def _runs(acc: dict[str, Any] = ACC, loss: dict[str, Any] = LOSS) -> list[dict[str, Any]]:
    runs = []
    for method in SEEDS:
        order = range(len(SEEDS[method]))
        if method == "hetlora":  # out of seed order: pairing must go by seed, not by position
            order = reversed(order)
        runs += [_run(method, i, acc[method], loss[method]) for i in order]
    return runs


@pytest.fixture(scope="module")
def summary() -> dict[str, Any]:
    return summarise(_runs())


def test_families_group_and_fall_back_to_the_method_name(summary: dict[str, Any]) -> None:
    assert summary["families"] == {
        "rank-limited": ["prelort", "segment", "hetlora"],
        "merged": ["flora"],
        "homogeneous": ["fedit-r2"],
    }
    assert [method_family(m) for m in ("flexlora", "flora", "fedit", "fedit-max", "fedit-r8")] == [
        "rank-limited",
        "merged",
        "homogeneous",
        "homogeneous",
        "homogeneous",
    ]
    m = summary["methods"]
    assert m["fedit-r2"]["oracle_level"] == 2 and m["segment"]["oracle_level"] is None
    # an oracle keeps only its level and has no area under the rank curve
    assert set(m["fedit-r2"]["per_rank"]) == {"2"} and m["fedit-r2"]["auc"] == {}
    assert set(m["flora"]["per_rank"]) == {"2", "4"}
    # an explicit family wins over the name
    runs = [_run("prelort", i, ACC["prelort"], LOSS["prelort"]) for i in range(3)]
    for r in runs:
        r["method"], r["family"] = "custom", "merged"
    assert summarise(runs)["families"] == {"merged": ["custom"]}


def test_oracle_level_derived_from_name_without_the_field() -> None:
    runs = [_run("fedit-r2", i, ACC["fedit-r2"], LOSS["fedit-r2"]) for i in range(2)]
    for r in runs:
        del r["family"], r["oracle_level"]
        r["method"] = "fedit-r4"
    e = summarise(runs)["methods"]["fedit-r4"]
    assert e["family"] == "homogeneous" and e["oracle_level"] == 4
    assert list(e["per_rank"]) == ["4"] and e["per_rank"]["4"]["accuracy"]["values"] == [0.95, 0.96]


@pytest.mark.parametrize("name", ["fedit-r0", "fedit-r04", "fedit-r4\n"])
def test_non_canonical_oracle_names_are_no_oracles(name: str) -> None:
    # the method table's oracle_level: N has no leading zero and nothing follows it
    runs = [_run("fedit-r2", i, ACC["fedit-r2"], LOSS["fedit-r2"]) for i in range(2)]
    for r in runs:
        del r["family"], r["oracle_level"]
        r["method"] = name
    s = summarise(runs)
    e = s["methods"][name]
    assert e["family"] == "homogeneous" and e["oracle_level"] is None
    assert list(e["per_rank"]) == ["2", "4"] and set(e["auc"]) == {"loss", "accuracy"}
    assert f"| {name} |" in summary_markdown(s) and "(oracle)" not in summary_markdown(s)


def test_compute_and_communication_means(summary: dict[str, Any]) -> None:
    m = summary["methods"]
    assert m["prelort"]["compute"]["passes"] == pytest.approx(1010.0)  # 1000, 1010, 1020
    assert m["prelort"]["compute"]["examples"] == pytest.approx(5000.0)
    assert m["prelort"]["compute"]["bytes_up"] == pytest.approx(101.0)
    assert m["hetlora"]["compute"]["bytes_up"] == pytest.approx(101.5)  # seeds 0..3
    # old files without totals: summed from the per-round records (5 + 7, 40 + 60)
    assert m["segment"]["compute"]["passes"] == pytest.approx(12.0)
    assert m["segment"]["compute"]["examples"] == pytest.approx(100.0)
    assert m["prelort"]["seeds"] == [0, 1, 2] and m["hetlora"]["seeds"] == [3, 2, 1, 0]


def test_paired_differences_match_hand_computation(summary: dict[str, Any]) -> None:
    p = paired_differences(summary)
    assert p["reference"] == "prelort" and p["baselines"] == ["segment", "hetlora"]
    assert summary["paired"] == p

    # accuracy r=2, prelort - segment: d = 0.02, 0.04, 0.00 -> mean 0.02, sd 0.02
    s = p["differences"]["segment"]["2"]["accuracy"]
    assert s["n"] == 3 and s["seeds"] == [0, 1, 2]
    assert s["diffs"] == pytest.approx([0.02, 0.04, 0.0])
    assert s["mean_diff"] == pytest.approx(0.02)
    assert s["std_diff"] == pytest.approx(0.02)
    assert s["t_quantile"] == pytest.approx(T_DF2, rel=1e-8)
    assert s["ci_half_width"] == pytest.approx(T_DF2 * 0.02 / math.sqrt(3))
    assert s["ci_low"] == pytest.approx(-0.0296827542, abs=1e-9)
    assert s["ci_high"] == pytest.approx(0.0696827542, abs=1e-9)
    assert (s["wins"], s["ties"], s["losses"]) == (2, 1, 0)

    # accuracy r=2, prelort - hetlora: only seeds 0..2 pair (hetlora seed 3 is left out)
    s = p["differences"]["hetlora"]["2"]["accuracy"]
    assert s["n"] == 3 and s["seeds"] == [0, 1, 2]
    assert s["diffs"] == pytest.approx([0.10, 0.12, 0.11])
    assert s["mean_diff"] == pytest.approx(0.11)
    assert s["ci_low"] == pytest.approx(0.0851586229, abs=1e-9)
    assert s["ci_high"] == pytest.approx(0.1348413771, abs=1e-9)
    assert (s["wins"], s["ties"], s["losses"]) == (3, 0, 0)

    # accuracy r=4, prelort - segment: d = -0.10, -0.11, -0.10
    s = p["differences"]["segment"]["4"]["accuracy"]
    assert s["mean_diff"] == pytest.approx(-0.31 / 3)
    assert s["ci_low"] == pytest.approx(-0.1176755091, abs=1e-9)
    assert s["ci_high"] == pytest.approx(-0.0889911576, abs=1e-9)
    assert (s["wins"], s["ties"], s["losses"]) == (0, 0, 3)

    # loss (lower is better) r=4, prelort - hetlora: d = -0.05, +0.02, -0.09 -> 2 wins, 1 loss
    s = p["differences"]["hetlora"]["4"]["loss"]
    assert s["better"] == "lower"
    assert s["mean_diff"] == pytest.approx(-0.04)
    assert s["ci_low"] == pytest.approx(-0.1783109342, abs=1e-9)
    assert s["ci_high"] == pytest.approx(0.0983109342, abs=1e-9)
    assert (s["wins"], s["ties"], s["losses"]) == (2, 0, 1)

    # loss r=2, prelort - segment: d = -0.05, -0.05, 0.00 -> negative differences are wins
    s = p["differences"]["segment"]["2"]["loss"]
    assert (s["wins"], s["ties"], s["losses"]) == (2, 1, 0)
    # flora and the oracle are no rank-limited baselines
    assert set(p["differences"]) == {"segment", "hetlora"}
    json.dumps(summary, allow_nan=False)  # summary.json stays valid JSON


def test_lower_is_better_flips_wins_and_verdict() -> None:
    def only(metric: str) -> dict[str, Any]:
        runs = _runs()
        for r in runs:
            for pr in [rec["per_rank"] for rec in r["rounds"]]:  # final is the last round's dict
                for lv in pr:
                    pr[lv] = {metric: pr[lv]["accuracy"]}
        return summarise(runs)

    hi, lo = only("accuracy"), only("perplexity")
    for base, lv in (("segment", "2"), ("hetlora", "2"), ("segment", "4"), ("hetlora", "4")):
        a = hi["paired"]["differences"][base][lv]["accuracy"]
        b = lo["paired"]["differences"][base][lv]["perplexity"]
        assert a["mean_diff"] == pytest.approx(b["mean_diff"])
        assert (a["wins"], a["ties"], a["losses"]) == (b["losses"], b["ties"], b["wins"])
    # accuracy r=4: prelort is clearly below segment (loss); as perplexity the best baseline is
    # the lowest mean (hetlora 0.73) and prelort is clearly above it: lower is better -> loss too,
    # while vs segment the same numbers would be a win
    assert hi["verdict"]["levels"]["4"]["accuracy"]["baseline"] == "segment"
    assert hi["verdict"]["levels"]["4"]["accuracy"]["verdict"] == "loss"
    assert lo["verdict"]["levels"]["4"]["perplexity"]["baseline"] == "hetlora"
    # accuracy r=2: best baseline segment (mean 0.70), a tie; as perplexity hetlora (mean 0.62),
    # prelort higher on every seed -> loss; as accuracy vs hetlora that is a clear win
    assert hi["verdict"]["levels"]["2"]["accuracy"]["baseline"] == "segment"
    assert hi["verdict"]["levels"]["2"]["accuracy"]["verdict"] == "tie (within noise)"
    assert lo["verdict"]["levels"]["2"]["perplexity"]["baseline"] == "hetlora"
    assert lo["verdict"]["levels"]["2"]["perplexity"]["verdict"] == "loss"
    flipped = lo["paired"]["differences"]["segment"]["4"]["perplexity"]
    assert (flipped["wins"], flipped["losses"]) == (3, 0)


def test_verdict_picks_the_best_baseline(summary: dict[str, Any]) -> None:
    v = verdict_table(summary)
    assert summary["verdict"] == v
    rows = v["levels"]
    # accuracy: segment has the higher mean at both levels (0.70 vs 0.62; 0.913 vs 0.73)
    assert rows["2"]["accuracy"]["baseline"] == "segment"
    assert rows["2"]["accuracy"]["baseline_mean"] == pytest.approx(0.70)
    assert rows["2"]["accuracy"]["reference_mean"] == pytest.approx(0.72)
    assert rows["2"]["accuracy"]["verdict"] == "tie (within noise)"
    assert rows["4"]["accuracy"]["verdict"] == "loss"
    # loss: hetlora has the lower mean at both levels (0.2875 vs 0.483; 0.3125 vs 0.337)
    assert rows["2"]["loss"]["baseline"] == "hetlora"
    assert rows["2"]["loss"]["verdict"] == "loss"  # d = +0.10 on every seed
    assert rows["4"]["loss"]["baseline"] == "hetlora"
    assert rows["4"]["loss"]["mean_diff"] == pytest.approx(-0.04)
    assert rows["4"]["loss"]["verdict"] == "tie (within noise)"
    # a clear win: without segment, hetlora is the best accuracy baseline at r=2
    runs = [r for r in _runs() if r["method"] != "segment"]
    w = summarise(runs)["verdict"]["levels"]["2"]["accuracy"]
    assert (w["baseline"], w["verdict"]) == ("hetlora", "win")


def test_single_shared_seed_is_inconclusive() -> None:
    runs = [r for r in _runs() if r["method"] in ("prelort", "segment") and r["seed"] == 0]
    s = summarise(runs)
    cell = s["paired"]["differences"]["segment"]["2"]["accuracy"]
    assert cell["n"] == 1 and cell["ci_low"] is None and cell["ci_half_width"] is None
    assert s["verdict"]["levels"]["2"]["accuracy"]["verdict"] == "inconclusive (n < 2)"
    json.dumps(s, allow_nan=False)


def test_t_quantile_table_without_scipy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "scipy.stats", None)  # makes the import fail
    assert t_quantile(2) == pytest.approx(T_DF2, rel=1e-8)
    assert t_quantile(1) == pytest.approx(12.7062047, rel=1e-8)
    assert t_quantile(30) == pytest.approx(2.04227246, rel=1e-8)
    assert t_quantile(31) == 1.96
    with pytest.raises(ValueError):
        t_quantile(0)


def _row(md: str, label: str, *after: str) -> list[str]:
    """Cells of the first table row for ``label`` after the headings ``after``, found in turn."""
    section = md
    for a in after:
        section = section[section.index(a) :]
    line = next(x for x in section.splitlines() if x.startswith(f"| {label} |"))
    return [c.strip() for c in line.strip().strip("|").split("|")]


def test_markdown_groups_families_and_blanks_oracles(summary: dict[str, Any]) -> None:
    md = summary_markdown(summary, title="T")
    heads = ["### Rank-limited adapters", "### Merged models", "### Homogeneous references"]
    pos = [md.index(h) for h in heads]
    assert pos == sorted(pos)
    assert "FlexLoRA: its rank-r SVD truncation" in md and "identical at every level" in md
    assert "all clients with all data" in md
    # per metric, one table per family in family order
    acc = md.index("## accuracy (higher is better)")
    sub = [md.index(f"### accuracy: {t}", acc) for t in ("rank-limited", "merged", "homogeneous")]
    assert sub == sorted(sub)
    # the oracle: a value at r=2, blank at r=4 and in the AUC column
    cells = _row(md, "fedit-r2 (oracle)", "## accuracy")
    assert cells[1] == "0.91 ± 0.014" and cells[2] == "" and cells[3] == ""
    cells = _row(md, "flora", "## accuracy")
    assert cells[1] == cells[2] == "0.76 ± 0.01"
    # compute table; old files without totals still get passes from the rounds
    assert "## Compute and communication" in md
    assert _row(md, "prelort", "## Compute")[:4] == ["prelort", "rank-limited", "1010", "5000"]
    assert _row(md, "segment", "## Compute")[2] == "12"
    # paired and verdict tables
    assert "## Paired differences: prelort minus each rank-limited baseline" in md
    paired = ("## Paired differences", "### accuracy")
    assert _row(md, "hetlora", *paired)[1:6] == ["2", "+0.11", "[+0.0852, +0.135]", "3", "3/0/0"]
    assert _row(md, "hetlora", "## Paired differences", "### loss")[1:6] == [
        "2",
        "+0.1",
        "[+0.1, +0.1]",
        "3",
        "0/0/3",
    ]
    verdict = md[md.index("## Verdict") :]
    assert "| 4 | accuracy | segment |" in verdict and "| loss |" in verdict
    assert "tie (within noise)" in verdict


def test_no_reference_no_paired_sections() -> None:
    runs = [r for r in _runs() if r["method"] != "prelort"]
    s = summarise(runs)
    assert "paired" not in s and "verdict" not in s
    md = summary_markdown(s)
    assert "Paired differences" not in md and "## Verdict" not in md


def test_old_summary_without_per_method_seeds_still_pairs(summary: dict[str, Any]) -> None:
    old = json.loads(json.dumps(summary))
    for k in ("paired", "verdict", "families", "metrics"):
        old.pop(k)
    for mt in ("prelort", "segment"):
        for k in ("seeds", "family", "oracle_level", "compute"):
            old["methods"][mt].pop(k)
    old["methods"] = {mt: old["methods"][mt] for mt in ("prelort", "segment")}
    old["seeds"] = [0, 1, 2]
    p = paired_differences(old)
    assert p["differences"]["segment"]["2"]["accuracy"]["mean_diff"] == pytest.approx(0.02)
    assert "## Verdict" in summary_markdown(old)


def test_plot_summary_writes_pngs(summary: dict[str, Any], tmp_path: Any) -> None:
    paths = plot_summary(summary, _runs(), tmp_path)
    names = {p.name for p in paths}
    for m in ("accuracy", "loss"):
        assert {f"{m}_vs_rank.png", f"{m}_vs_round.png", f"{m}_paired_diff.png"} <= names
    for p in paths:
        assert p.parent == tmp_path and p.stat().st_size > 1000
    no_ref = summarise([r for r in _runs() if r["method"] != "prelort"])
    names = {p.name for p in plot_summary(no_ref, _runs(), tmp_path / "b")}
    assert "loss_vs_rank.png" in names and not any("paired" in n for n in names)
