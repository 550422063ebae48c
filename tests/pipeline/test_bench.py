"""`pipeline bench` runs and reports well-formed figures. Its numbers are not asserted here:
speed belongs to the benchmark command itself, on a quiet machine, never to a test."""

import io
import json
import math
from pathlib import Path

import pytest
from rich.console import Console

from pipeline import bench
from pipeline.cli.measure import _bench_table
from tests.conftest import invoke, invoke_json

TINY = dict(samples=600, classes=16, features=16, teacher_width=64, student_width=16, batch_size=64, epochs=2, lm_vocab=0,
            reader_rows=3000, reader_tokens=20000, reader_vocab=300, writer_vocab=500, writer_teacher="gpt2:layers=1,dim=16,heads=2",
            writer_rows=6)
# Section 11 (train-student at a language model's vocabulary) has a test of its own, below.
TINY_OPTIONS = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()] + ["--student-vocab=0"]
# Section 8 (cache-teacher's memory with a language model's vocabulary), small: 4 processes.
TINY_LM = ["--lm-vocab=3000", "--lm-seq=16"]
# Each timing taken once, not in turns: the tiny run's figures are not judged.
ONCE = {"THREAD_TURNS": 1, "ROUNDS": 1, "TEACHER_PASSES": 1, "READ_TURNS": 1}


@pytest.fixture(scope="module")
def tiny_bench(tmp_path_factory) -> tuple[dict, Path]:
    """Every section but 11 at tiny sizes, run once for the tests that read its report (the JSON
    report, and the table made from it): (the report, the kept folder). Read only."""
    folder = tmp_path_factory.mktemp("bench") / "bench"
    with pytest.MonkeyPatch.context() as monkeypatch:
        for name, turns in ONCE.items():
            monkeypatch.setattr(bench, name, turns)
        code, out, err = invoke("bench", *TINY_OPTIONS, *TINY_LM, "--json", "--keep", folder)
    assert code == 0, err
    return json.loads(out), folder


def test_bench_reports_every_ratio(tiny_bench):
    report, folder = tiny_bench
    assert set(report["ratios"]) == {
        "cache_vs_forward", "student_cache_vs_memory", "student_cache_vs_hard_labels", "student_cache_vs_online_kd",
        "memory_10x_vs_1x", "shuffled_vs_sequential_reads", "checksummed_vs_plain_reads", "loaded_threads_chosen_vs_one",
        "loaded_threads_every_core_vs_one", "quiet_threads_chosen_vs_every_core", "lm_teacher_memory_8x_batch",
        "lm_teacher_memory_8x_batch_whole_logits", "reader_vs_memmap_dense", "reader_first_epoch_vs_memmap_dense",
        "reader_vs_memmap_tokens", "reader_first_epoch_vs_memmap_tokens", "lm_cache_vs_forward",
        "reader_manifest_checked_vs_unchecked_dense", "reader_manifest_checked_vs_unchecked_tokens",
    }
    writer = report["lm_writer"]
    assert (writer["vocab"], writer["rows"], writer["teacher"]) == (500, 6, "gpt2:layers=1,dim=16,heads=2,vocab=500")
    assert len(writer["bare_forward_seconds"]) == len(writer["cache_teacher_seconds"]) == ONCE["TEACHER_PASSES"]
    from stages.cache import CacheReader

    lm_cache = CacheReader(folder / "lm-writer.zarr")  # the top-32 token cache section 10 timed
    assert (lm_cache.layout.options.top_k, lm_cache.num_classes, lm_cache.layout.tokens) == (32, 500, writer["tokens"] // 6)
    lm = report["lm_teacher_memory"]
    assert (lm["vocab"], lm["seq"]) == (3000, 16) and set(lm) == {"vocab", "seq", "in_pieces", "whole_batch"}
    for arm in ("in_pieces", "whole_batch"):
        small, large = (lm[arm][f"batch_{b}"] for b in bench.LM_BATCHES)
        assert large["logits_mb_per_batch"] == 8 * small["logits_mb_per_batch"] and small["peak_rss_mb"] > 100
    assert all(isinstance(v, float) and math.isfinite(v) and v > 0 for v in report["ratios"].values())
    assert set(report["meets_targets"]) == set(report["targets"]) and all(isinstance(v, bool) for v in report["meets_targets"].values())
    assert report["memory"]["10x"]["cache_rows"] == 10 * report["memory"]["1x"]["cache_rows"] == 6000
    assert report["memory"]["10x"]["cache_bytes"] > 5 * report["memory"]["1x"]["cache_bytes"]
    assert report["machine"]["cpu_count"] >= 1 and report["parameters"]["teacher"] > report["parameters"]["student"]
    assert (folder / "cache.zarr" / "zarr.json").is_file()


def test_bench_quick_prints_ratios_without_verdicts(tmp_path, monkeypatch):
    """--quick sizes are too small to judge by: no ok column in the table, null verdicts in JSON.
    (A section or two: what --quick does to verdicts does not depend on which ran.)"""
    monkeypatch.setattr(bench, "QUICK", bench.BenchConfig(**TINY, student_vocabs=(), quick=True))
    code, out, _ = invoke("bench", "--quick", "--epochs", "1", "--only", "core")
    assert code == 0 and "cache_vs_forward" in out and "break-even" in out and "too small to judge" in out
    header = next(line for line in out.splitlines() if "measured" in line)
    assert "ok" not in header and not {"yes", "NO"} & set(out.replace("│", " ").split())
    code, out, _ = invoke("bench", "--quick", "--only", "reader", "--json")
    assert code == 0 and json.loads(out)["meets_targets"] is None and json.loads(out)["targets"]


def test_bench_table_rows_are_sane(tiny_bench):
    """Every ratio is a row with a positive measured value, a target or "(info)", and a verdict
    that follows from the two; the break-even count is a whole number. (The table the command
    prints for the shared run's report; test_bench_quick_prints_ratios_without_verdicts prints one.)"""
    console = Console(width=250, record=True, file=io.StringIO())
    console.print(_bench_table(tiny_bench[0]))
    out = console.export_text()
    rows = {cells[0]: cells[1:] for line in out.splitlines() if line.startswith("│")
            for cells in [[c.strip() for c in line.strip("│").split("│")]]}
    assert {"cache_vs_forward", "student_cache_vs_memory", "student_cache_vs_hard_labels", "student_cache_vs_online_kd",
            "memory_10x_vs_1x", "shuffled_vs_sequential_reads"} <= set(rows)
    breaks_even = rows.pop("break-even student runs")[0]
    assert breaks_even == "None" or int(breaks_even) >= 1, breaks_even
    for name, (measured, target, ok) in rows.items():
        value = float(measured)
        assert math.isfinite(value) and value > 0, (name, measured)
        if target == "(info)":
            assert ok == "", name
            continue
        sense, bound = target.split()
        assert sense in ("<=", ">=") and float(bound) > 0, (name, target)
        assert ok == ("yes" if (value <= float(bound)) == (sense == "<=") else "NO"), (name, measured, target, ok)
    assert float(rows["memory_10x_vs_1x"][0]) < 3  # peak memory does not follow the cache's size


def test_bench_reader_section_alone_reads_the_same_bytes_as_its_memory_map(tmp_path):
    """--only reader: the training reader and the memory map of the same arrays, for a dense and a
    top-32 token cache of the sizes asked for; nothing else runs."""
    code, out, err = invoke("bench", *TINY_OPTIONS, "--only", "reader", "--lm-seq=50", "--json", "--keep", tmp_path / "bench")
    assert code == 0, err
    report = json.loads(out)
    checked = ("reader_manifest_checked_vs_unchecked_dense", "reader_manifest_checked_vs_unchecked_tokens")
    assert set(report["ratios"]) == {"reader_vs_memmap_dense", "reader_first_epoch_vs_memmap_dense", "reader_vs_memmap_tokens",
                                     "reader_first_epoch_vs_memmap_tokens", *checked}
    assert report["target_sense"] == {"reader_vs_memmap_dense": ">=", "reader_vs_memmap_tokens": ">=", **dict.fromkeys(checked, ">=")}
    dense, tokens = report["reader"]["dense"], report["reader"]["tokens"]
    assert (dense["rows"], dense["classes"], dense["positions_per_row"]) == (3000, 16, 1)
    assert (tokens["rows"], tokens["positions_per_row"], tokens["classes"], tokens["top_k"]) == (400, 50, 300, 32)
    # the memory map holds exactly the arrays train-student reads: index, and the kind's soft labels
    assert dense["bytes_read"] == 3000 * (8 + 16 * 2)
    assert tokens["bytes_read"] == 400 * (8 + 50 * (32 * 2 + 32 * 2 + 4))
    assert not (tmp_path / "bench" / "cache.zarr").exists()  # the core sections did not run
    from stages.cache import CacheReader

    cache = CacheReader(tmp_path / "bench" / "reader-tokens.zarr")  # a valid cache of the project's own format
    assert cache.layout.options.top_k == 32 and cache.num_classes == 300


def test_bench_refuses_an_unknown_section():
    code, _, err = invoke("bench", *TINY_OPTIONS, "--only", "nonsense")
    assert code != 0 and "unknown bench section" in err and "Traceback" not in err


def test_the_student_memory_section_measures_pieces_and_whole_logits_in_fresh_processes(tmp_path):
    """Section 11 at test sizes: every (row length, batch) has a run in pieces, whole-logits runs
    where they fit and the bare student's steps; its ratios come from those figures."""
    pytest.importorskip("transformers")
    report = invoke_json("bench", "--only", "lm-student", "--student-vocab", "3000", "--student-seq", "16", "--device", "cpu")
    figures = report["lm_student"]["3000"]
    assert set(figures) == {f"seq_16_batch_{b}" for b in (4, 32)}
    for run in figures.values():
        for arm in ("in_pieces", "whole_logits"):
            assert 100 < run[arm]["train"]["peak_rss_mb"] <= run[arm]["train_and_evaluate"]["peak_rss_mb"]
            assert run[arm]["seconds_per_step"] > 0
        assert run["bare_student"]["peak_rss_mb"] > 100  # a process that ran the student (the libraries alone take that)
    largest, smallest = figures["seq_16_batch_32"], figures["seq_16_batch_4"]
    peak = {name: run["in_pieces"]["train"]["peak_rss_mb"] for name, run in (("large", largest), ("small", smallest))}
    bare = {name: run["bare_student"]["peak_rss_mb"] for name, run in (("large", largest), ("small", smallest))}
    ratios = report["ratios"]
    assert ratios["lm_student_train_memory_largest_vs_smallest_v3000"] == pytest.approx(peak["large"] / peak["small"])
    assert ratios["lm_student_train_memory_largest_vs_smallest_beyond_bare_v3000"] == pytest.approx(
        (peak["large"] - (bare["large"] - bare["small"])) / peak["small"])
    assert "lm_student_step_in_pieces_vs_whole_v3000" in report["ratios"]
