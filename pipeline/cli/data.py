"""tokenize: a corpus or a chat set, once, into a token dataset."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pipeline.cli import JsonOption, _emit, _key_value_table, _progress_bar, command, data_root
from pipeline.specs import parse_spec


@command("tokenize", no_args_is_help=True, rich_help_panel="Data")
def tokenize_command(
    spec: Annotated[str, typer.Argument(metavar="SPEC", help="What to tokenize: a corpus: or a chat: spec (the forms are above).")],
    out: Annotated[Path | None, typer.Option(help="Token dataset to write (a Zarr folder). (default: data/tokens/SOURCE-seqN.zarr)")] = None,
    workers: Annotated[int, typer.Option(min=1, help="Processes tokenizing work units in parallel, one core each.")] = 1,
    chunk_tokens: Annotated[int, typer.Option(min=1, help="Tokens per chunk, the unit a reader decodes.")] = 1 << 16,
    work_unit_bytes: Annotated[int, typer.Option(min=1, help="Bytes of source text per work unit (what a worker tokenizes at once, and what a resumed run redoes at most).")] = 1 << 20,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing token dataset at --out. Without it, re-running the same command resumes an interrupted one.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Tokenize a corpus or a chat set once into a token dataset that every command reads lazily as --dataset tokens:DIR.

    Token ids in the smallest unsigned type that holds the vocabulary, row boundaries, document ids, the mask of trained positions (a chat set's assistant tokens), the tokenizer's and the source's fingerprints, and each split's fingerprint. Resumes after a kill: re-run the same command.

    SPEC, with its optional keys in brackets:

        corpus:PATH,tokenizer=hf:FOLDER,seq=N[,field=text,test=5,max_tokens=M]
        chat:PATH,tokenizer=hf:FOLDER,seq=N[,messages=messages,prompt=prompt,
          completion=completion,train_on=assistant|all,too_long=cut|drop,test=5]

    PATH: .txt/.jsonl files or a folder of them, a .parquet or .arrow file, or a datasets save_to_disk folder.

    Examples:

        pipeline tokenize corpus:docs.jsonl,tokenizer=hf:tok,seq=512 \\
          --out data/tokens/docs.zarr --workers 2

        pipeline tokenize chat:chats.jsonl,tokenizer=hf:tok,seq=1024 \\
          --out data/tokens/chats.zarr
    """
    from pipeline.tokens import TokenizeConfig, parse_source, tokenize

    if out is None:
        source = parse_source(spec)
        out = data_root() / "tokens" / f"{parse_spec(spec).slug()}-seq{source.seq}.zarr"
    with _progress_bar("tokenizing") as progress:
        report = tokenize(TokenizeConfig(spec, out, workers=workers, chunk_tokens=chunk_tokens, work_unit_bytes=work_unit_bytes,
                                         overwrite=overwrite), progress)
    rows = {f"{name} rows / tokens / trained": f"{v['rows']:,} / {v['tokens']:,} / {v['trained_targets']:,}" for name, v in report["splits"].items()}
    _emit(as_json, report, _key_value_table(f"token dataset {report['out']}", {
        "source": report["source"], "dtype": report["dtype"], **rows, **{f"source rows {k}": v for k, v in report["counts"].items() if k == "records" or report["source"].startswith("chat:")},
        "seconds": report["seconds"], "tokens/s": report["tokens_per_second"]}))
