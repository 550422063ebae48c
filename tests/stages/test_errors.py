"""The known failures (stages.errors): each carries the exit code the README documents, and
Terminated, which the CLI raises on SIGTERM, travels as Ctrl-C does: past `except Exception`, into
the cleanup that handles KeyboardInterrupt."""

from __future__ import annotations

import re
import signal
from pathlib import Path

import pytest

from stages import errors
from stages.errors import CacheDamagedError, CacheLockedError, CacheMismatchError, InputError, PipelineError, Terminated

README = Path(__file__).resolve().parents[2] / "README.md"

# Which README exit-code row each failure stands for (the row's meaning starts with these words).
MEANINGS = {
    PipelineError: "runtime failure", InputError: "bad input", CacheMismatchError: "the cache does not fit",
    CacheDamagedError: "the cache is damaged", CacheLockedError: "the cache (or a train-student run folder) is locked",
    Terminated: "terminated (SIGTERM)",
}


def _documented_codes() -> dict[str, int]:
    """The README's exit-code table, as {meaning: code}."""
    section = README.read_text().split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    return {meaning.strip(): int(code) for code, meaning in re.findall(r"^\| (\d+) \| (.+?) \|$", section, re.MULTILINE)}


@pytest.mark.parametrize("error", list(MEANINGS), ids=lambda e: e.__name__)
def test_each_failure_exits_with_the_code_the_readme_documents(error):
    documented = [code for meaning, code in _documented_codes().items() if meaning.startswith(MEANINGS[error])]
    assert documented == [error.exit_code], (error.__name__, error.exit_code, _documented_codes())
    assert error("message").exit_code == error.exit_code  # an instance carries its class's code


def test_every_failure_class_is_in_the_table_and_no_two_share_a_code():
    failures = [value for value in vars(errors).values() if isinstance(value, type) and hasattr(value, "exit_code")]
    assert set(failures) == set(MEANINGS)
    assert len({error.exit_code for error in failures}) == len(failures)


def test_user_errors_are_pipeline_errors_so_one_handler_reports_them_all():
    for error in (InputError, CacheMismatchError, CacheDamagedError, CacheLockedError):
        with pytest.raises(PipelineError):
            raise error("x")


def test_terminated_exits_as_the_shell_reports_a_death_by_sigterm():
    assert Terminated.exit_code == 128 + signal.SIGTERM


def test_a_sigterm_raised_as_terminated_passes_except_exception_and_reaches_interrupt_cleanup():
    """As the CLI installs it: a SIGTERM handler raising Terminated, and a real SIGTERM to this
    process. Code that turns any Exception into an error report must not swallow it; the cleanup
    that runs after Ctrl-C must run after it too."""
    def terminate(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, terminate)
    steps = []
    try:
        try:
            try:
                signal.raise_signal(signal.SIGTERM)
                steps.append("went on after the signal")
            except Exception:  # noqa: BLE001 - the broad handler a stage uses to report failures
                steps.append("swallowed as an error")
        except KeyboardInterrupt as interrupt:
            steps.append(type(interrupt).__name__)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert steps == ["Terminated"]
