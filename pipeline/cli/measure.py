"""What this machine does with the pipeline: bench, gpu-check, and the docs' figures regenerated from them."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from pipeline.cli import DeviceOption, JsonOption, _emit, _fail, command


@command("bench", rich_help_panel="This machine")
def bench_command(
    quick: Annotated[bool, typer.Option("--quick", help="Small sizes: about half a minute on 2 CPU cores (checks that it runs).")] = False,
    samples: Annotated[int | None, typer.Option(min=256, help="Training rows. (default: 20000; quick 4000)")] = None,
    classes: Annotated[int | None, typer.Option(min=2, help="Classes. (default: 1000; quick 200)")] = None,
    features: Annotated[int | None, typer.Option(min=1, help="Input features. (default: 256; quick 128)")] = None,
    teacher_width: Annotated[int | None, typer.Option(min=1, help="Teacher MLP width (3 hidden layers). (default: 4096; quick 1024)")] = None,
    student_width: Annotated[int | None, typer.Option(min=1, help="Student MLP width (2 hidden layers). (default: 256; quick 128)")] = None,
    batch_size: Annotated[int | None, typer.Option(min=1, help="Batch size for both stages. (default: 256)")] = None,
    epochs: Annotated[int | None, typer.Option(min=1, help="Student epochs per measured run. (default: 3; quick 2)")] = None,
    lm_vocab: Annotated[int | None, typer.Option(min=0, help="Vocabulary of the language-model teacher whose cache-teacher memory is measured (0: skip). (default: 70000)")] = None,
    lm_seq: Annotated[int | None, typer.Option(min=8, help="Its tokens per row, and the reader section's. (default: 256; quick 64)")] = None,
    reader_rows: Annotated[int | None, typer.Option(min=1, help="Rows of the reader section's dense cache. (default: 100000; quick 20000)")] = None,
    reader_tokens: Annotated[int | None, typer.Option(min=8, help="Positions of the reader section's top-32 token cache. (default: 4000000; quick 500000)")] = None,
    reader_vocab: Annotated[int | None, typer.Option(min=33, help="Its vocabulary. (default: 8192)")] = None,
    writer_vocab: Annotated[int | None, typer.Option(min=0, help="Vocabulary of the language-model teacher whose cache-teacher time is measured against its bare forward (0: skip). (default: 32000)")] = None,
    writer_teacher: Annotated[str | None, typer.Option(help="That teacher, a gpt2: spec without its vocab. (default: gpt2:layers=4,dim=512,heads=8; quick 2 layers of 256)")] = None,
    writer_rows: Annotated[int | None, typer.Option(min=1, help="Rows of --lm-seq tokens it caches. (default: 64; quick 16)")] = None,
    student_vocab: Annotated[list[int] | None, typer.Option(min=0, help="A vocabulary at which train-student's memory and step time are measured (repeatable; 0: skip the section). (default: 32000 and 128256; quick: skipped)")] = None,
    student_seq: Annotated[list[int] | None, typer.Option(min=8, help="A row length for that section (repeatable). (default: 128 and 1024)")] = None,
    only: Annotated[list[str] | None, typer.Option(help="Run only this section (repeatable): core (1-7), lm-memory (8), reader (9), lm-writer (10), lm-student (11).")] = None,
    device: DeviceOption = "auto",
    keep: Annotated[Path | None, typer.Option(help="Keep the benchmark's caches and runs in this folder.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Measure what the cache costs and buys on this machine, as ratios from one run.

    cache-teacher vs the bare teacher forward; train-student from the cache vs logits in memory, vs hard labels and vs online KD; peak memory with a 10x larger cache; shuffled vs sequential reads; cache-teacher's peak memory at a 70,000-token vocabulary for two batch sizes; the training reader vs a memory map of the same bytes (a dense and a top-32 token cache); cache-teacher vs the bare forward of a GPT-2-style teacher at a 32,000-token vocabulary; train-student's peak memory and step time for a tiny GPT-2 student at 32,000 and 128,256 classes, rows of 128 and 1,024 and batches of 4 and 32, its loss in pieces of positions and on whole logits. Prints a table (or --json) with each ratio's target.

    Examples:

        pipeline bench --quick

        pipeline bench --only reader
    """
    from pipeline.bench import QUICK, BenchConfig, run_bench, with_sizes

    config = with_sizes(QUICK if quick else BenchConfig(), samples=samples, classes=classes, features=features,
                        teacher_width=teacher_width, student_width=student_width, batch_size=batch_size, epochs=epochs,
                        lm_vocab=lm_vocab, lm_seq=lm_seq, reader_rows=reader_rows, reader_tokens=reader_tokens,
                        reader_vocab=reader_vocab, writer_vocab=writer_vocab, writer_teacher=writer_teacher, writer_rows=writer_rows,
                        student_vocabs=tuple(v for v in student_vocab if v) if student_vocab else None,
                        student_seqs=tuple(student_seq) if student_seq else None, only=tuple(only) if only else None, device=device)
    report = run_bench(config, keep)
    _emit(as_json, report, _bench_table(report))


def _bench_table(report: dict) -> Table:
    c = report["config"]
    table = Table(title=f"pipeline bench on {report['machine']['device']} ({report['machine']['cpu_count']} CPUs): "
                        f"{c['samples']} rows, {c['classes']} classes, teacher width {c['teacher_width']}, student width {c['student_width']}")
    verdicts = report["meets_targets"]  # None for --quick: its sizes are too small to judge by
    columns = ("ratio", "measured", "target", "ok")[:3 if verdicts is None else 4]
    for column in columns:
        table.add_column(column, justify="left" if column == "ratio" else "right")
    for name, value in report["ratios"].items():
        target = report["targets"].get(name)
        sense = report["target_sense"].get(name)
        ok = (verdicts or {}).get(name)
        row = (name, f"{value:.3f}", f"{sense} {target}" if target else "(info)", "" if ok is None else ("yes" if ok else "NO"))
        table.add_row(*row[:len(columns)])
    if "break_even_student_runs" in report:
        table.add_row(*("break-even student runs", str(report["break_even_student_runs"]), "", "")[:len(columns)])
    if verdicts is None:
        table.caption = "--quick: sizes too small to judge the ratios by their targets"
    return table


@command("gpu-check", rich_help_panel="This machine")
def gpu_check_command(
    device: DeviceOption = "auto",
    size: Annotated[str | None, typer.Option(help="full (one CUDA GPU: a few minutes, under 8), small (1-2 minutes on 2 CPU cores) or test (seconds: every step's path, as the tests run it). (default: full on CUDA, small on a CPU)")] = None,
    keep: Annotated[Path | None, typer.Option(help="Keep the check's caches, runs and logs in this folder.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Check both stages, the benchmark and torchrun on this machine's device, and print one table.

    cache-teacher of a GPT-2-style language model at a real vocabulary (top-k per token, random weights, nothing downloaded) without autocast and under bf16 autocast, in tokens per second and against the bare teacher forward over the same batches; every ratio of pipeline bench at quick sizes; a train-student epoch from the cache; and train-student under torchrun as one process (NCCL on CUDA, gloo on a CPU). Every step runs even when another fails; the exit code is 1 if any failed.

    Examples:

        pipeline gpu-check --device cuda

        pipeline gpu-check --device cpu --json
    """
    from pipeline.gpu_check import gpu_check_table, run_gpu_check

    report = run_gpu_check(device, size, keep)
    _emit(as_json, report, gpu_check_table(report))
    failed = [step for step in report["steps"] if not step["ok"]]
    if failed:
        _fail(f"{len(failed)} of {len(report['steps'])} steps failed; {failed[0]['step']}: {failed[0]['note']}", 1)


@command("figures", rich_help_panel="This machine")
def figures_command(
    only: Annotated[list[str] | None, typer.Option(help="Regenerate only this block (repeatable), including one a plain run leaves alone.")] = None,
    list_blocks: Annotated[bool, typer.Option("--list", help="List the blocks, where they are, their commands and whether a plain run regenerates them.")] = False,
    check: Annotated[bool, typer.Option(help="Run nothing: name the blocks HEAD might print differently (generated from uncommitted changes, or before a change to pipeline/, stages/, data/ or pyproject.toml), and exit with 1 if there are any.")] = False,
    quick: Annotated[bool, typer.Option("--quick", help="Run the bench at its quick size (figures to check that it works, not to quote).")] = False,
    root: Annotated[Path | None, typer.Option(help="The checkout whose README.md and docs/*.md to rewrite. (default: this tool's own)")] = None,
    log: Annotated[Path | None, typer.Option(help="Append the commands' stderr to this file instead of printing it.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Regenerate every figure block of README.md and docs/*.md from the command it names, in place.

    A block is the text between <!-- figures: NAME --> and <!-- /figures -->. Each block's command (pipeline bench, demo, demo-lm, ... with --json) runs once, in a process of its own, in the checkout; the block is rewritten as a provenance line (commit, date, machine, load average before and after, Python, torch, zarr and numpy versions, the exact command) and tables rendered from the report. Blocks whose command takes too long for a plain run are regenerated only with --only. A block whose command fails keeps its text, and the exit code is 1.

    Examples:

        pipeline figures --list

        pipeline figures

        pipeline figures --only demo-llm

        pipeline figures --check
    """
    from pipeline.figures import FIGURES, all_blocks, regenerate, stale

    checkout = (root or Path(__file__).resolve().parents[2]).resolve()
    if list_blocks:
        blocks = all_blocks(checkout)
        rows = [{"name": b.name, "file": str(b.path.relative_to(checkout)), "command": "pipeline " + " ".join(FIGURES[b.name].command),
                 "minutes": FIGURES[b.name].minutes, "default": FIGURES[b.name].default} for b in blocks]
        table = Table(title=f"figure blocks in {checkout}")
        for column in ("block", "file", "command", "about", "plain run"):
            table.add_column(column)
        for row in rows:
            table.add_row(row["name"], row["file"], row["command"], f"{row['minutes']:g} min", "yes" if row["default"] else "only with --only")
        _emit(as_json, {"blocks": rows}, table)
        return
    if check:
        found = stale(checkout)
        table = Table(title=f"figure blocks HEAD might print differently in {checkout}")
        for column in ("block", "file", "why"):
            table.add_column(column)
        for block, why in found:
            table.add_row(block.name, str(block.path.relative_to(checkout)), why)
        _emit(as_json, {"stale": [{"name": b.name, "file": str(b.path.relative_to(checkout)), "why": why} for b, why in found]}, table)
        if found:
            raise typer.Exit(1)
        return
    result = regenerate(checkout, only, quick=quick, log=log, say=lambda line: print(line, file=sys.stderr, flush=True))
    table = Table(title="pipeline figures")
    for column in ("command", "minutes"):
        table.add_column(column)
    for command_line, minutes in result["minutes"].items():
        table.add_row(command_line, f"{minutes:.1f}")
    table.caption = (f"regenerated: {', '.join(result['regenerated']) or 'none'}; "
                     f"left as they were: {', '.join(result['left']) or 'none'}")
    _emit(as_json, result, table)
