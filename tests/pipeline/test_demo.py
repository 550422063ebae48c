"""The demo's wiring, on a shortened schedule (the full demo is the README's first command)."""

import json

from pipeline import demo
from tests.conftest import invoke


def test_demo_runs_every_step_and_reports(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "TEACHER_EPOCHS", 1)
    monkeypatch.setattr(demo, "STUDENT_EPOCHS", 1)
    code, out, err = invoke("demo", "--out", tmp_path / "demo", "--seeds", "1", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["test_samples"] == 1000 and 0 < report["teacher"]["test_errors"] < 1000
    assert [(s["mode"], s["seed"]) for s in report["students"]] == [("scratch", 0), ("distilled", 0)]
    assert report["cache"]["bytes_on_disk"] > 0 and (tmp_path / "demo" / "cache.zarr" / "zarr.json").is_file()
    assert set(report["mean_test_errors"]) == {"scratch", "distilled"}
