"""The demo's verdict (`tec_pipeline.demo.report`) and the seed summary of the demo-seeds study
(`experiments.demo_seeds`), from reports written by hand: the runs themselves train for minutes."""
import json

import pytest

from experiments.demo_seeds import run_demo_seeds
from tec_pipeline.demo.report import format_margins, format_report, format_stages, margins, verdict
from tec_pipeline.errors import UserError


def rows(tec_knn, tec_lin):
    return [{"name": "pixels", "knn": 0.35, "linear": 0.2}, {"name": "base", "knn": 0.4, "linear": 0.3},
            {"name": "control", "knn": 0.42, "linear": 0.31}, {"name": "tec", "knn": tec_knn, "linear": tec_lin}]


@pytest.mark.parametrize("knn,lin,expected", [(0.5, 0.4, "TEC beats"), (0.41, 0.4, "NOT beat both the base and the "
                                              "control in: knn"), (0.5, 0.305, "in: linear")])
def test_verdict_needs_both_metrics_above_base_and_control(knn, lin, expected):
    assert expected in verdict(rows(knn, lin))


def test_seed_summary_reads_finished_seeds(tmp_path, capsys):
    for seed, (knn, lin) in enumerate([(0.5, 0.4), (0.6, 0.5), (0.41, 0.2)]):
        (tmp_path / f"seed{seed}").mkdir()
        report = {"rows": rows(knn, lin), "wall_s": {"a": 1.0}, "verdict": verdict(rows(knn, lin))}
        (tmp_path / f"seed{seed}" / "report.json").write_text(json.dumps(report))
    result = run_demo_seeds([0, 1, 2], tmp_path)
    assert result["summary"]["tec"]["knn"]["mean"] == pytest.approx(0.5033333, abs=1e-6)
    assert result["summary"]["tec"]["knn"]["std"] == pytest.approx(0.0776030, abs=1e-6)  # population std
    assert result["tec_wins"] == "2/3"
    assert json.loads((tmp_path / "seeds.json").read_text())["tec_wins"] == "2/3"
    assert "2/3 seeds" in capsys.readouterr().out


def test_seed_summary_of_the_val_split_reads_only_val_reports(tmp_path):
    """A folder tuned with --val holds both reports; each summary reads its own split."""
    (tmp_path / "seed0").mkdir()
    for name, knn in (("report.json", 0.5), ("report_val.json", 0.3)):
        report = {"rows": rows(knn, 0.4), "wall_s": {"a": 1.0}, "verdict": verdict(rows(knn, 0.4))}
        (tmp_path / "seed0" / name).write_text(json.dumps(report))
    assert run_demo_seeds([0], tmp_path, split="val")["summary"]["tec"]["knn"]["mean"] == 0.3
    assert json.loads((tmp_path / "seeds_val.json").read_text())["split"] == "val"
    assert run_demo_seeds([0], tmp_path)["summary"]["tec"]["knn"]["mean"] == 0.5


def test_seed_summary_refuses_a_report_made_with_other_overrides(tmp_path):
    (tmp_path / "seed0").mkdir()
    report = {"rows": rows(0.5, 0.4), "wall_s": {"a": 1.0}, "verdict": "", "overrides": ["targets.k=8"]}
    (tmp_path / "seed0" / "report.json").write_text(json.dumps(report))
    with pytest.raises(UserError, match=r"overrides \['targets.k=8'\], this summary asks for none"):
        run_demo_seeds([0], tmp_path)
    assert run_demo_seeds([0], tmp_path, overrides=["targets.k=8"])["summary"]["tec"]["knn"]["mean"] == 0.5


def test_margins_say_whether_a_win_exceeds_test_set_noise(tmp_path, capsys):
    """On 1,000 images: TEC right on 100 more than the base is a margin whose interval excludes 0;
    right on 3 more than the control (and wrong on 1 it got) is one whose interval includes 0."""
    n = 1000
    tec = ["1"] * 400 + ["0"] * 600
    base = ["1"] * 300 + ["0"] * 700
    control = ["1"] * 397 + ["0"] * 3 + ["1"] + ["0"] * 599
    rows = [{"name": name, "knn": h.count("1") / n, "linear": h.count("1") / n,
             "hits": {"knn": "".join(h), "linear": "".join(h)}}
            for name, h in (("base", base), ("control", control), ("tec", tec))]
    found = margins(rows)
    assert found["base"]["knn"]["diff"] == pytest.approx(100 / n) and found["base"]["knn"]["low"] > 0
    assert found["control"]["linear"]["diff"] == pytest.approx(2 / n)
    assert found["control"]["linear"]["low"] < 0 < found["control"]["linear"]["high"]
    text = format_margins(found)
    assert text.splitlines()[0].startswith("TEC - base") and "k-NN +10.0 (95% CI" in text
    (tmp_path / "seed0").mkdir()
    report = {"rows": rows, "wall_s": {"a": 1.0}, "verdict": "TEC beats ...", "margins": found}
    (tmp_path / "seed0" / "report.json").write_text(json.dumps(report))
    assert run_demo_seeds([0], tmp_path)["clear_margins"] == "2/4"  # base: both clear; control: neither
    assert "excludes 0: 2/4" in capsys.readouterr().out


def test_stage_table_totals():
    text = format_stages({"cache-targets": 10.0, "train TEC": 20.5}, 2_500_000)
    assert "total" in text and "30.5" in text and "2.5 MB" in text


def test_a_run_prints_its_table_stages_verdict_and_margins():
    hits = {"knn": "1100", "linear": "1010"}
    table = [{"name": name, "knn": 0.5, "linear": 0.5, "probe_C": 0.01, "dim": 8, "hits": hits}
             for name in ("base", "control", "tec")]
    report = {"rows": table, "wall_s": {"eval": 2.0}, "cache_bytes": 1_000_000, "verdict": verdict(table),
              "margins": margins(table)}
    lines = format_report(report).splitlines()
    assert lines[0].split() == ["model", "dim", "k-NN", "linear", "C"] and lines[3].startswith("tec")
    assert lines[4].split() == ["stage", "wall", "s"] and "1.0 MB" in lines[7]
    assert lines[8] == report["verdict"] and lines[9].startswith("TEC - base") and len(lines) == 11
