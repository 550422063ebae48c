"""Commands on a written cache: verify, inspect, combine, and evaluate a model against one."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from pipeline.cli import (CACHE, DATA, MODEL, SPEC_FORMS, CachedDatasetOption, DeviceOption, JsonOption, ModelOption, ReplayAugmentOption,
                          StorageOption, _apply_storage_options, _emit, _key_value_table, _renamed, command, data_root)
from pipeline.specs import cache_stem
from stages.errors import CacheDamagedError, InputError
from stages.storage import cache_location


@command("verify", rich_help_panel="Caches", epilog=SPEC_FORMS)
def verify_command(
    ctx: typer.Context,
    cache: Annotated[str, typer.Argument(help="The cache to check: a folder or an fsspec URL.", show_default=False)],
    teacher: ModelOption = None,
    teacher_weights: Annotated[Path | None, typer.Option(rich_help_panel=MODEL, help="Weights for --teacher.")] = None,
    dataset: CachedDatasetOption = None,
    augment: ReplayAugmentOption = None,
    rows: Annotated[int, typer.Option(min=0, rich_help_panel=DATA, help="Rows to re-run the teacher on.")] = 32,
    samples: Annotated[int | None, typer.Option(min=0, hidden=True)] = None,  # --rows' old name: --samples means classes drawn elsewhere
    seed: Annotated[int, typer.Option(rich_help_panel=DATA, help="Seed choosing the rows.")] = 0,
    device: DeviceOption = "auto",
    storage_option: StorageOption = None,
    as_json: JsonOption = False,
) -> None:
    """Check a cache: metadata, completeness, every chunk readable and finite, index and labels.

    With --teacher, re-run the teacher on --rows random rows and report the largest difference from the stored logits/T. Exits 0 only when every check passes, 4 otherwise.

    Example:

        pipeline verify data/caches/cnn-mnist-5k-train-T4.zarr --teacher cnn \\
          --teacher-weights data/teachers/cnn-mnist-5k.safetensors
    """
    from pipeline.jobs import run_verify

    rows = _renamed(ctx, "samples", "rows", samples, rows)
    if teacher_weights is not None and teacher is None:
        raise InputError("--teacher-weights needs --teacher SPEC (the model the weights are for)")
    cache = cache_location(cache)
    _apply_storage_options(storage_option, cache)
    report = run_verify(cache, teacher=teacher, teacher_weights=teacher_weights, dataset=dataset,
                        samples=rows, seed=seed, device=device, augment=augment)
    table = Table(title=f"verify {cache}")
    for column in ("check", "result", "detail"):
        table.add_column(column)
    for check in report.checks:
        table.add_row(check["check"], "ok" if check["ok"] else "FAILED", check["detail"])
    _emit(as_json, report.as_dict(), table)
    if not report.ok:
        failed = ", ".join(c["check"] for c in report.checks if not c["ok"])
        raise CacheDamagedError(f"cache {cache} failed verification: {failed}")


@command("combine", rich_help_panel="Caches")
def combine_command(
    caches: Annotated[list[str], typer.Argument(help="Two or more dense caches of the same dataset split, in the same order, at the same T (folders or fsspec URLs).", show_default=False)],
    out: Annotated[str, typer.Option(rich_help_panel=CACHE, help="The ensemble cache to write: a folder or an fsspec URL.", show_default=False)],
    rule: Annotated[str, typer.Option(rich_help_panel=CACHE, help="mean-probs (average the teachers' softened probabilities) or mean-logits (average their logits / T).")] = "mean-probs",
    overwrite: Annotated[bool, typer.Option("--overwrite", rich_help_panel=CACHE, help="Replace an existing cache at --out.")] = False,
    storage_option: StorageOption = None,
    as_json: JsonOption = False,
) -> None:
    """Combine several teachers' caches into one cache of their ensemble, for students to distil from.

    Every teacher's provenance and the rule are recorded in the new cache. Caches of other datasets, splits, row orders, temperatures or class counts are refused.

    Example:

        pipeline combine data/caches/cnn-s0.zarr data/caches/cnn-s1.zarr \\
          --out data/caches/cnn-ensemble.zarr
    """
    from stages.ensemble import CombineConfig, run

    for location in (*caches, out):
        _apply_storage_options(storage_option, cache_location(location))
    result = run(CombineConfig(caches=tuple(map(cache_location, caches)), out=cache_location(out), rule=rule, overwrite=overwrite))
    _emit(as_json, vars(result), _key_value_table("ensemble cache written", vars(result)))


@command("evaluate", rich_help_panel="Students", epilog=SPEC_FORMS)
def evaluate_command(
    model: ModelOption,
    weights: Annotated[Path | None, typer.Option(rich_help_panel=MODEL, help="Its weights (.safetensors or a state dict), e.g. RUN/model.safetensors.")] = None,
    dataset: CachedDatasetOption = None,
    split: Annotated[str, typer.Option(rich_help_panel=DATA, help="Split to measure accuracy, NLL and speed on.")] = "test",
    cache: Annotated[str | None, typer.Option(rich_help_panel=DATA, help="Also report agreement with this cache's teacher top-1, on the cache's own split (a folder or an fsspec URL).")] = None,
    augment: ReplayAugmentOption = None,
    batch_size: Annotated[int, typer.Option(min=1, rich_help_panel=MODEL, help="Batch size for evaluation and for the latency measurement.")] = 256,
    device: DeviceOption = "auto",
    storage_option: StorageOption = None,
    as_json: JsonOption = False,
) -> None:
    """Measure a trained model: accuracy, NLL, agreement with a cached teacher, size and speed.

    Latency is the median of 20 timed forward passes of one batch after 3 warm-up passes.

    Example:

        pipeline evaluate --model mlp-400 --dataset mnist-5k \\
          --weights data/runs/mlp-400-kd-s0/model.safetensors \\
          --cache data/caches/cnn-mnist-5k-train-T4.zarr
    """
    from pipeline.jobs import run_evaluate

    cache = None if cache is None else cache_location(cache)
    if cache is not None:
        _apply_storage_options(storage_option, cache)
    report = run_evaluate(model, weights, dataset=dataset, split=split, cache=cache, batch_size=batch_size, device=device,
                          augment=augment)
    _emit(as_json, report, _key_value_table(f"evaluate {model}", _flattened(report)))


@command("inspect", rich_help_panel="Caches")
def inspect_command(
    cache: Annotated[str, typer.Argument(help="The cache to describe: a folder or an fsspec URL.", show_default=False)],
    png: Annotated[Path | None, typer.Option(help="Where to write the plots (confidence and entropy histograms, reliability). (default: data/inspect/CACHE-NAME.png)")] = None,
    reference: Annotated[str | None, typer.Option(help="A dense cache of the same teacher and dataset, of all its rows or a slice: also report the KL and total variation from its distribution to this cache's, over the rows both hold.")] = None,
    reference_rows: Annotated[int | None, typer.Option(min=1, help="Compare with --reference over the first N rows both hold only. (default: all)")] = None,
    storage_option: StorageOption = None,
    as_json: JsonOption = False,
) -> None:
    """Describe a cache: provenance, layout, size, the teacher's quality and calibration.

    Shows bytes on disk per row (and per token), the teacher's accuracy, NLL and calibration error (ECE) at T=1 and at the cache's T, for a top-k cache how much probability the kept entries miss, for a top-k or qtopk cache the bits it stores per kept class id, and for a quantised (qtopk) cache the error its quantisation introduced; writes histograms of the teacher's confidence and entropy and a reliability diagram to a PNG. With --reference DENSE-CACHE, how far this cache's distribution is from the dense one's (the bytes-versus-quality trade-off of a top-k, qtopk or sampled cache).

    Example:

        pipeline inspect data/caches/cnn-mnist-5k-train-T4.zarr
    """
    from stages.inspection import describe_cache, distance_from_reference, plot_report

    if png is not None and png.suffix.lower() != ".png":
        raise InputError(f"--png must name a .png file, got {png}")
    cache = cache_location(cache)
    _apply_storage_options(storage_option, cache)
    report = describe_cache(cache)
    if reference is not None:
        dense = cache_location(reference)
        _apply_storage_options(storage_option, dense)  # the same credentials for a reference in the same store
        report["against_reference"] = distance_from_reference(cache, dense, reference_rows)
    if "histograms" in report:
        report["png"] = png or data_root() / "inspect" / f"{cache_stem(cache)}.png"
        plot_report(report, report["png"])
    brief = {k: v for k, v in report.items() if k not in ("histograms",)}
    brief["calibration"] = {t: {k: v for k, v in entry.items() if k != "reliability"} for t, entry in report.get("calibration", {}).items()}
    _emit(as_json, report, _key_value_table(f"cache {cache}", _flattened(brief)))


def _flattened(report: dict, prefix: str = "") -> dict[str, Any]:
    """Nested report entries as dotted keys, for a two-column table."""
    rows: dict[str, Any] = {}
    for key, value in report.items():
        if isinstance(value, dict):
            rows.update(_flattened(value, f"{prefix}{key}."))
        else:
            rows[f"{prefix}{key}"] = value
    return rows
