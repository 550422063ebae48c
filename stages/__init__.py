"""The library behind the `pipeline` CLI: the cache contract, the two stages and the losses.

Usable from Python without the CLI:

    from stages import cache_teacher, train_student
    cache_teacher.run(cache_teacher.CacheTeacherConfig(...), teacher=my_module, split=my_split)

and in your own training loop (stages.loop):

    from stages import CacheDataset, kd_loss

The stages log their progress (chunks, epochs, metrics) at INFO on the `stages` logger. Until the
application configures logging itself, those lines go to stderr, so a script shows progress by
default; once the root logger has a handler, records go there alone.
"""

import logging

__version__ = "0.2.0"

# Your own training loop (stages.loop), importable as `from stages import CacheDataset, kd_loss, HiddenAndHead`.
# Loaded on first use: they load torch, and the CLI, which imports stages.config at start-up, must not.
_LOOP = ("CacheDataset", "kd_loss", "HiddenAndHead")


def __getattr__(name: str):
    if name in _LOOP:
        from stages import loop

        return getattr(loop, name)
    raise AttributeError(f"module 'stages' has no attribute {name!r}")


class _UntilConfigured(logging.StreamHandler):
    """stderr, only while the application has configured no logging of its own."""

    def emit(self, record: logging.LogRecord) -> None:
        if not logging.getLogger().handlers:
            super().emit(record)


_progress = _UntilConfigured()
_progress.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
logging.getLogger(__name__).addHandler(_progress)
logging.getLogger(__name__).setLevel(logging.INFO)
