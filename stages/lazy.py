"""Modules imported on first use, for the modules the CLI reads at start-up.

The kinds (stages.kinds) declare their options, which the CLI turns into flags when it starts,
beside the code that encodes and decodes their rows with numpy and torch. `pipeline --help`
must not wait for those (torch alone takes about 2 s to import), so a kind module names them
through `lazy_module`, which imports the real module when an attribute is first looked up.
"""

from __future__ import annotations

import importlib
from types import ModuleType


class _LazyModule:
    """Stands for the module `name`: every attribute lookup goes to the imported module."""

    def __init__(self, name: str):
        self._name = name
        self._module: ModuleType | None = None

    def __getattr__(self, attribute: str):
        # Kept once imported: the kinds look attributes up on every chunk they encode or decode.
        if self._module is None:
            self._module = importlib.import_module(self._name)
        return getattr(self._module, attribute)

    def __repr__(self) -> str:
        return f"<module {self._name!r}, imported on first use>"


def lazy_module(name: str) -> _LazyModule:
    """The module `name`, imported when one of its attributes is first used."""
    return _LazyModule(name)
