"""Text classification datasets: JSON lines or CSV files, tokenized into padded token ids.

    text:PATH,tokenizer=hf:FOLDER[,max_length=128][,text=text][,label=label][,split=split]

PATH is a .jsonl or .csv file whose rows carry their split in the `split` field, or a folder
holding train.jsonl and test.jsonl (or .csv). Each row's `text` field is tokenized with the
named tokenizer (a Hugging Face tokenizer folder: a teacher's own, given as hf:FOLDER), padded
with its padding id or cut to `max_length` tokens; the token ids (N, max_length) are what both
stages see. Labels are the `label` field: whole numbers are class numbers as they are; any
other labels are numbered in sorted order over every split (the split's `class_names`).
Rows without a label make an unlabeled split (a transfer set); a split mixing both is refused.

`write_stdlib_docstrings` builds a real corpus on any machine: the docstrings of the Python
standard library, labelled by the package they come from.
"""

from __future__ import annotations

import ast
import csv
import hashlib
import io
import json
import sysconfig
from functools import cache
from pathlib import Path

import numpy as np
import torch

from pipeline.hf import tokenizer_from_spec
from pipeline.specs import path_and_options
from stages.data import TensorSplit
from stages.errors import InputError

TEXT_OPTIONS = {"tokenizer": None, "max_length": "128", "text": "text", "label": "label", "split": "split"}
SPLITS = ("train", "test")


def parse_text_spec(args: str) -> tuple[Path, dict[str, str]]:
    """`PATH,key=value,...` -> (path, options over the defaults)."""
    path, options = path_and_options("text", args, TEXT_OPTIONS)
    if not options["max_length"].isdigit() or int(options["max_length"]) < 1:
        raise InputError(f"dataset spec text:{args}: max_length must be a whole number of at least 1")
    return Path(path), options


@cache
def text_splits(args: str) -> dict[str, TensorSplit]:
    path, options = parse_text_spec(args)
    rows = _read_rows(path, options["split"])
    field, label_field = options["text"], options["label"]
    for split, items in rows.items():
        for number, row in enumerate(items, 1):
            if not isinstance(row.get(field), str):
                raise InputError(f"{path}: row {number} of split {split!r} has no text field {field!r}")
    classes, names = _classes([row.get(label_field) for items in rows.values() for row in items], path)
    tokenizer = tokenizer_from_spec(options["tokenizer"])
    length = int(options["max_length"])
    splits = {}
    for split, items in rows.items():
        if not items:  # an empty file: an empty split, which resolving it reports as such
            splits[split] = TensorSplit(split, torch.zeros((0, length), dtype=torch.int64), None, len(names) or None)
            continue
        encoded = tokenizer([row[field] for row in items], padding="max_length", truncation=True, max_length=length,
                            return_tensors="np")["input_ids"].astype(np.int64)
        labels = [row.get(label_field) for row in items]
        if any(label is None for label in labels) and not all(label is None for label in labels):
            raise InputError(f"{path}: split {split!r} has rows with and without a {label_field!r} field")
        y = None if labels[0] is None else np.array([classes[label] for label in labels], dtype=np.int64)
        splits[split] = TensorSplit(split, torch.from_numpy(encoded), y, len(names) or None, class_names=tuple(names))
    return splits


def _read_rows(path: Path, split_field: str) -> dict[str, list[dict]]:
    if path.is_dir():
        found = {split: next((path / f"{split}{suffix}" for suffix in (".jsonl", ".csv") if (path / f"{split}{suffix}").is_file()), None)
                 for split in SPLITS}
        if not any(found.values()):
            raise InputError(f"{path}: no train.jsonl, test.jsonl, train.csv or test.csv in this folder")
        return {split: _read_file(file) for split, file in found.items() if file is not None}
    if not path.is_file():
        raise InputError(f"dataset file not found: {path}")
    by_split: dict[str, list[dict]] = {}
    for number, row in enumerate(_read_file(path), 1):
        split = row.get(split_field)
        if not isinstance(split, str):
            raise InputError(f"{path}: row {number} has no {split_field!r} field naming its split (train or test)")
        by_split.setdefault(split, []).append(row)
    return by_split


def _read_file(path: Path) -> list[dict]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read dataset file {path}: {exc}") from exc
    if path.suffix == ".csv":
        # Empty cells are missing values; newline="" keeps line breaks inside quoted fields.
        return [{k: v for k, v in row.items() if v != ""} for row in csv.DictReader(io.StringIO(text, newline=""))]
    if path.suffix != ".jsonl":
        raise InputError(f"{path}: a text dataset is a .jsonl or .csv file")
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise InputError(f"{path}: line {number} is not JSON ({exc})") from exc
        if not isinstance(row, dict):
            raise InputError(f"{path}: line {number} is not a JSON object")
        rows.append(row)
    return rows


def _classes(labels: list, path: Path) -> tuple[dict, list[str]]:
    """(label -> class number, the class names in class order). Whole numbers (or their
    strings, as CSV gives them) are their own numbers; other labels are numbered in sorted order."""
    present = {label for label in labels if label is not None}
    if not present:
        return {}, []
    if any(isinstance(label, int) and label < 0 or isinstance(label, str) and label.lstrip("-").isdigit() and int(label) < 0
           for label in present):
        raise InputError(f"{path}: labels must not be negative numbers")
    if all(isinstance(label, int) and not isinstance(label, bool) or isinstance(label, str) and label.isdigit()
           for label in present):
        return {label: int(label) for label in present}, [str(n) for n in range(max(map(int, present)) + 1)]
    if any(not isinstance(label, str) for label in present):
        raise InputError(f"{path}: labels must be whole numbers or strings")
    names = sorted(present)
    return {label: number for number, label in enumerate(names)}, names


# The docstring corpus: ten packages of the standard library with a few hundred docstrings each,
# on every CPython 3.11 install (tkinter's Python sources ship even where Tk itself is absent).
DOCSTRING_PACKAGES = ("asyncio", "email", "http", "importlib", "logging", "multiprocessing", "tkinter", "unittest",
                      "urllib", "xml")
DOCSTRING_MIN_CHARS = 20
DOCSTRING_MAX_CHARS = 512
TEST_FRACTION = 0.2


def write_stdlib_docstrings(path: Path) -> dict[str, dict[str, int]]:
    """Write the standard library's docstrings (modules, classes, functions) of DOCSTRING_PACKAGES
    as JSON lines {"text", "label" (the package), "split", "source"}; returns the counts per
    split and label. Deterministic for one Python version.

    Texts seen twice, or under two labels, are kept once or dropped. The test split takes 20% of
    each package by whole groups (a module's top-level function or class with its methods, as
    ordered by a hash of the name), so no class has methods on both sides."""
    root = Path(sysconfig.get_paths()["stdlib"])
    seen: dict[str, str | None] = {}
    entries = []
    for file in sorted(root.rglob("*.py")):
        parts = file.relative_to(root).parts
        if len(parts) < 2 or parts[0] not in DOCSTRING_PACKAGES or {"test", "tests", "idle_test"} & set(parts):
            continue
        module = ".".join((*parts[:-1], file.stem) if file.stem != "__init__" else parts[:-1])
        for name, group, text in _docstrings(file, module):
            label = parts[0]
            if seen.get(text, label) != label:
                seen[text] = None  # under two labels: a giveaway or noise, dropped below
            elif text not in seen:
                seen[text] = label
                entries.append({"text": text, "label": label, "source": name, "group": group})
    entries = [e for e in entries if seen[e["text"]] == e["label"]]
    counts: dict[str, dict[str, int]] = {split: {} for split in SPLITS}
    rows = []
    for label in DOCSTRING_PACKAGES:
        mine = [e for e in entries if e["label"] == label]
        groups: dict[str, list[dict]] = {}
        for entry in mine:
            groups.setdefault(entry["group"], []).append(entry)
        budget, taken = round(TEST_FRACTION * len(mine)), 0
        for group in sorted(groups, key=lambda g: hashlib.sha1(g.encode()).hexdigest()):
            split = "test" if taken + len(groups[group]) <= budget else "train"
            taken += len(groups[group]) if split == "test" else 0
            for entry in groups[group]:
                rows.append({"text": entry["text"], "label": label, "split": split, "source": entry["source"]})
                counts[split][label] = counts[split].get(label, 0) + 1
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return counts


def _docstrings(file: Path, module: str):
    """(qualified name, group, docstring) of the module and every class and function in it."""
    try:
        tree = ast.parse(file.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return
    stack = [(tree, module, None)]
    while stack:
        node, name, group = stack.pop(0)
        text = ast.get_docstring(node, clean=True) if hasattr(node, "body") and not isinstance(node, ast.If) else None
        if text and len(text) >= DOCSTRING_MIN_CHARS:
            yield name, group or name, text[:DOCSTRING_MAX_CHARS]
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                child_name = f"{name}.{child.name}"
                stack.append((child, child_name, group or (child_name if node is tree else name)))
