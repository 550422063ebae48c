"""Known failures, each with the process exit code the CLI turns it into.

The CLI prints the message as one line and exits with `exit_code`; anything else is a bug and
shows as an internal error. The codes are documented in the README.
"""


class PipelineError(Exception):
    """A runtime failure the user can act on (exit code 1)."""

    exit_code = 1


class InputError(PipelineError):
    """Bad input: an unknown spec, a missing or malformed file, an invalid option value,
    an existing output without `overwrite` (exit code 2, like a usage error)."""

    exit_code = 2


class CacheMismatchError(PipelineError):
    """The cache does not fit what it is used with: another dataset or ordering, another
    class count, an incomplete cache, or a schema newer than this tool (exit code 3)."""

    exit_code = 3


class CacheDamagedError(PipelineError):
    """A cache whose contents fail a check: an unreadable chunk, non-finite values, a broken
    index or label array (exit code 4). `pipeline verify` reports every such problem."""

    exit_code = 4


class CacheLockedError(PipelineError):
    """Another process holds the writer lock of the cache, or of the run folder (exit code 5):
    retry when it is done."""

    exit_code = 5


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread by the CLI's signal handler. A KeyboardInterrupt, so that
    whatever cleans up after Ctrl-C (a cache writer's abort, the lock's release) runs after
    SIGTERM too, and the work resumes the same way; the CLI exits 143 (128 + 15, as the shell
    reports a death by SIGTERM)."""

    exit_code = 143
