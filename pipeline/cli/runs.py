"""sweep: a grid of students from one cache, ranked on a leaderboard."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from pipeline.cli import JsonOption, _emit, _fail, command, data_root


@command("sweep", rich_help_panel="Students")
def sweep_command(
    config: Annotated[Path, typer.Argument(help="TOML file describing the grid (see docs/reusing-a-cache.md).", show_default=False)],
    jobs: Annotated[int, typer.Option(min=1, help="Runs at a time, each in its own process (1: one after another, in this process).")] = 1,
    out: Annotated[Path | None, typer.Option(help="Folder for the runs and the leaderboard. (default: the file's `out`, else data/sweeps/CONFIG-NAME)")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Start every run over (after changing the sweep's options); without it finished runs are reused and interrupted ones resume.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Train a grid of students from one cache and rank them on a leaderboard.

    The grid: students x alphas x temperatures x seeds, plus each student on hard labels. Finished runs are reused and interrupted ones resume, so re-running the same command after a kill does only what is left. Every run of a seed starts from the same weights and reads the same batches (hard-label runs read the cache for the order alone), so each group's accuracy is also shown minus its student's on hard labels, paired by seed, with a 95% interval and whether that interval says it beats them. Writes leaderboard.csv, leaderboard.json and leaderboard.png (test accuracy against student size and against T) into the sweep folder.

    Example:

        pipeline sweep sweep.toml --jobs 2
    """
    from pipeline.sweep import read_sweep, run_sweep

    runs = read_sweep(config, out, data_root(), overwrite)
    folder = runs[0].config.out.parent
    board = run_sweep(runs, folder, jobs)
    code = board.pop("exit_code")
    _emit(as_json, board, _leaderboard_table(board))
    if board["failures"]:
        first, why = sorted(board["failures"].items())[0]
        hint = " (to start every run over with the new options: pipeline sweep --overwrite)" if "other options" in why else ""
        _fail(f"{len(board['failures'])} of {board['runs_total']} runs failed; {first}: {why}{hint}", code)


def _leaderboard_table(board: dict) -> Table:
    table = Table(title=f"sweep {board['folder']}: {board['runs_total']} runs ({board['runs_reused']} reused), best first")
    for column in ("student", "params", "labels", "alpha", "T", "divergence", "seeds", "test acc", "min-max", "errors",
                   "vs hard labels, paired (95% interval)", "beats hard labels"):
        table.add_column(column, justify="left" if column in ("student", "labels", "divergence", "beats hard labels") else "right",
                         overflow="fold")
    for g in board["groups"]:
        against = "" if g["vs_hard_labels_mean"] is None else f"{g['vs_hard_labels_mean']:+.4f}" + (
            "" if g["vs_hard_labels_low"] is None else f" [{g['vs_hard_labels_low']:+.4f}, {g['vs_hard_labels_high']:+.4f}]")
        table.add_row(
            g["student"], str(g["num_parameters"]), "hard" if g["mode"] == "scratch" else "soft",
            "" if g["alpha"] is None else f"{g['alpha']:g}", "" if g["temperature"] is None else f"{g['temperature']:g}",
            g["divergence"] or "", str(g["seeds"]), f"{g['accuracy_mean']:.4f}", f"{g['accuracy_min']:.3f}-{g['accuracy_max']:.3f}", f"{g['errors_mean']:.1f}",
            against, g["beats_hard_labels"] or "",
        )
    return table
