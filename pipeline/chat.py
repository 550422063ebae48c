"""A chat tokenizer and an instruction set made on the machine, offline: for tests, measurements and demos.

`stdlib_chat_tokenizer(folder)` is the standard library's byte-level BPE (pipeline.corpus) with
ChatML's turn markers as special tokens and a ChatML chat template in its tokenizer_config.json.
`stdlib_instructions(path)` writes questions about standard-library functions answered by their
docstrings, as JSONL rows of `messages` (a system, a user and an assistant turn).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from pipeline.corpus import _folder_written_atomically, stdlib_tokenizer
from pipeline.text import write_stdlib_docstrings

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SYSTEM = "You answer questions about the Python standard library."


def stdlib_chat_tokenizer(folder: Path, vocab: int = 512) -> Path:
    """The stdlib BPE of `vocab` tokens plus <|im_start|> and <|im_end|>, with a ChatML chat
    template in tokenizer_config.json; written once, atomically, and returned."""
    folder = Path(folder)
    if (folder / "tokenizer.json").is_file():
        return folder
    from pipeline.hf import transformers

    library = transformers("the stdlib chat tokenizer")
    with tempfile.TemporaryDirectory() as scratch:
        base = stdlib_tokenizer(Path(scratch) / "base", vocab=vocab)
        tokenizer = library.AutoTokenizer.from_pretrained(base, local_files_only=True, trust_remote_code=False)
        tokenizer.add_special_tokens({"additional_special_tokens": [IM_START, IM_END]})

        def write(partial: Path) -> None:
            tokenizer.save_pretrained(partial)
            (partial / "chat_template.jinja").unlink(missing_ok=True)
            config = json.loads((partial / "tokenizer_config.json").read_text(encoding="utf-8"))
            config["chat_template"] = CHATML_TEMPLATE
            (partial / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
            shutil.copy(base / "config.json", partial / "config.json")

        _folder_written_atomically(folder, write)
    return folder


def stdlib_instructions(path: Path, limit: int | None = None) -> int:
    """Write JSONL chat rows {"messages": [system, user, assistant]}: "What does NAME do?" answered
    by NAME's docstring, for the standard library's documented functions and classes; returns the
    row count. Deterministic for one Python version."""
    path = Path(path)
    with tempfile.TemporaryDirectory() as scratch:
        docstrings = Path(scratch) / "docstrings.jsonl"
        write_stdlib_docstrings(docstrings)
        rows = [json.loads(line) for line in docstrings.read_text(encoding="utf-8").splitlines()]
    rows = rows[:limit] if limit is not None else rows
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as file:
        for row in rows:
            messages = [{"role": "system", "content": SYSTEM},
                        {"role": "user", "content": f"What does {row['source']} do?"},
                        {"role": "assistant", "content": row["text"]}]
            file.write(json.dumps({"messages": messages}) + "\n")
    return len(rows)
