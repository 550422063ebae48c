"""The `pipeline` application: the Typer CLI, configs, spec resolution and orchestration
(demo) over the `stages` library."""

import os
from pathlib import Path

from stages import __version__

# The default root for everything the tool reads and writes when no path is given.
DATA_ROOT = Path(os.environ.get("PIPELINE_DATA", "data"))

__all__ = ["DATA_ROOT", "__version__"]
