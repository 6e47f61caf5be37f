"""The crossing-share trend (supersub.report.crossing): points from runs and records, the fit."""

import json

import numpy as np
import pytest
import yaml

from supersub.report import crossing


def _run(folder, partition, models, tasks):
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps({"hierarchy": {"name": partition}, "models": models,
                                                     "tasks": tasks}))
    (folder / "config.yaml").write_text(yaml.safe_dump({"data": {"max_train_per_class": 100}, "model": {"width": 0.5},
                                                        "train": {"epochs": 30}}))


def _model(top1, sup, share):
    return {"top1": top1, "superclass_acc": sup, "crossing_error_share": share, "crossing_error_chance": 90.0}


def test_a_network_shared_by_runs_is_one_point_per_partition(tmp_path):
    tasks = {"vanilla": "/t/vanilla-1", "vanilla_long": "/t/long-1"}
    _run(tmp_path / "a" / "seed0", "auto:10", {"vanilla": _model(34.0, 52.0, 72.7), "two_stage_hard": _model(1, 2, 3)},
         tasks)
    _run(tmp_path / "b" / "seed0", "auto:10", {"vanilla": _model(34.0, 52.0, 72.7),
                                               "vanilla_long": _model(33.0, 51.0, 73.1)}, tasks)
    _run(tmp_path / "c" / "seed0", "learned:10", {"vanilla": _model(34.0, 70.0, 45.5)}, tasks)
    (tmp_path / "a" / "task").mkdir()
    (tmp_path / "a" / "task" / "metrics.json").write_text(json.dumps({"val_acc": 1.0}))  # not a run's: skipped
    points = crossing.points_from_runs([tmp_path])
    assert sorted((p.partition, p.label.split(": ")[1], p.crossing_share) for p in points) == [
        ("auto:10", "vanilla", 72.7), ("auto:10", "vanilla_long", 73.1), ("learned:10", "vanilla", 45.5)]
    assert points[0].label.startswith("100 img/class, width 0.5, 30 ep")


def test_recorded_points_derive_the_share_from_top1_and_superclass_accuracy(tmp_path):
    f = tmp_path / "rec.csv"
    f.write_text("# a comment\nlabel,partition,top1,superclass_acc,source\ncell A vanilla,auto:10,37.32,55.40,docs\n")
    (p,) = crossing.recorded_points(f)
    assert p.crossing_share == pytest.approx(100 * (100 - 55.40) / (100 - 37.32))
    f.write_text("label,partition,top1,superclass_acc,source\nbad,auto:10,60,50,docs\n")
    with pytest.raises(ValueError, match="'bad'.*top1 <= superclass_acc"):
        crossing.recorded_points(f)


def _points(shares, top1s, partition="auto:10"):
    return [crossing.Point(f"n{i}", partition, t, 50.0, s, None, "test") for i, (t, s) in enumerate(zip(top1s, shares))]


def test_fit_finds_where_a_falling_trend_meets_half():
    top1 = np.array([30.0, 35, 40, 45, 50])
    f = crossing.fit(_points(100 - top1, top1))  # share = 100 - top1: meets 50 at top-1 50
    assert f["slope"] == pytest.approx(-1.0)
    assert f["top1_at_target"] == pytest.approx(50.0)
    assert f["top1_at_target_ci"][0] == pytest.approx(50.0) and f["never_share"] == 0.0


def test_fit_of_a_flat_or_rising_trend_reports_no_crossing():
    top1 = [30.0, 35, 40, 45]
    f = crossing.fit(_points([70.0, 71, 72, 73], top1))
    assert f["slope"] > 0 and f["top1_at_target"] is None and f["never_share"] == 1.0
    assert "never" in crossing.markdown(_points([70.0, 71, 72, 73], top1), {"auto:10": f})
    assert crossing.fit(_points([70.0, 71], top1[:2]))["slope"] is None  # too few to fit


def test_cli_writes_table_json_and_figure(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    rec = tmp_path / "rec.csv"
    rec.write_text("label,partition,top1,superclass_acc,source\n" +
                   "".join(f"n{i},auto:10,{30 + 5 * i},{50 + 8 * i},docs\n" for i in range(4)))
    crossing.main([str(rec.parent), "--recorded", str(rec), "--out", str(tmp_path / "out" / "crossing")])
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"crossing.md", "crossing.json", "crossing.png"}
    doc = json.loads((tmp_path / "out" / "crossing.json").read_text())
    assert len(doc["points"]) == 4 and doc["fits"]["auto:10"]["slope"] < 0
    assert "| auto:10 | 4 |" in capsys.readouterr().out
