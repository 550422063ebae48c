"""`python -m pipeline` runs the CLI, as the `pipeline` console script does."""

from pipeline.cli import app

if __name__ == "__main__":
    app(prog_name="pipeline")
