"""`pipeline demo-chat`: instruction distillation with soft labels on the assistant's tokens only, offline.

An instruction set is made on the machine (questions about the standard library's functions,
answered by their docstrings: pipeline.chat.stdlib_instructions) and tokenized once through a
tokenizer folder with a ChatML chat template (pipeline.chat.stdlib_chat_tokenizer), twice: with
the assistant's tokens as the trained positions (`train_on=assistant`, what one distils), and with
every position trained (`train_on=all`, for the bytes it would cost); a conversation longer than
`seq` is dropped from both, so that they hold the same rows. A GPT-2-style teacher is
trained briefly on the assistant's tokens, cached top-k over both token datasets (the first cache
holds soft labels where the student learns only), and a smaller student is trained from the
masked cache and from the hard labels alone. The report: each cache's soft-label bytes, the
assistant's share of the tokens against the masked cache's share of the bytes, and the students'
held-out loss per assistant token.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

from rich.table import Table

# The stages load torch, which `pipeline --help` must not wait for: run_chat_demo imports them.


@dataclass(frozen=True)
class ChatDemo:
    """The demo's sizes: a few minutes on 2 CPU cores."""

    vocab: int = 2048
    seq: int = 192
    conversations: int = 1500  # of the instruction set (5% of them held out)
    teacher: str = "gpt2:layers=2,dim=96,heads=4"
    student: str = "gpt2:layers=1,dim=32,heads=2"
    teacher_epochs: int = 4
    student_epochs: int = 3
    batch_size: int = 16
    lr: float = 3e-3
    top_k: int = 32
    alpha: float = 0.5
    seed: int = 0


def run_chat_demo(out: Path, demo: ChatDemo = ChatDemo(), *, device: str = "auto") -> dict:
    """Run every stage into `out` (the tokenizer, the instructions and their token datasets are
    reused; caches and runs are made again) and return the report."""
    from pipeline.chat import stdlib_chat_tokenizer, stdlib_instructions
    from pipeline.demo import announce
    from pipeline.jobs import run_caching, run_training
    from pipeline.tokens import TokenizeConfig, tokenize
    from stages.cache_teacher import CacheTeacherConfig
    from stages.inspection import describe_cache
    from stages.train_student import TrainConfig

    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    instructions = out / "instructions.jsonl"
    announce("demo-chat", f"making the {demo.vocab:,}-token ChatML tokenizer and the instruction set -> {out / f'tokenizer-{demo.vocab}'}, {instructions}")
    tokenizer = stdlib_chat_tokenizer(out / f"tokenizer-{demo.vocab}", demo.vocab)
    if not instructions.is_file():
        stdlib_instructions(instructions, limit=demo.conversations)
    datasets, tokenized = {}, {}
    for trained in ("assistant", "all"):
        folder = out / f"tokens-{trained}"
        spec = f"chat:{instructions.absolute()},tokenizer=hf:{tokenizer.absolute()},seq={demo.seq},train_on={trained},too_long=drop"
        tokenized[trained] = tokenize(TokenizeConfig(spec=spec, out=folder))
        datasets[trained] = f"tokens:{folder.absolute()}"
    announce("demo-chat", f"tokenized {instructions} into {out / 'tokens-assistant'} and {out / 'tokens-all'}")

    teacher_weights = out / "teacher.safetensors"
    common = {"dataset": datasets["assistant"], "batch_size": demo.batch_size, "lr": demo.lr, "device": device, "overwrite": True}
    announce("demo-chat", f"training the teacher {demo.teacher} on the assistant's tokens -> {teacher_weights}")
    teacher = run_training(TrainConfig(model=demo.teacher, out=out / "teacher.run", weights_out=teacher_weights, alpha=0.0,
                                       epochs=demo.teacher_epochs, seed=demo.seed, **common))
    caches = {}
    for trained, dataset in datasets.items():
        path = out / f"cache-{trained}.zarr"
        announce("demo-chat", f"caching the teacher's top-{demo.top_k} over the {trained} positions -> {path}")
        result = run_caching(CacheTeacherConfig(
            teacher=demo.teacher, teacher_weights=teacher_weights, dataset=dataset, out=path, temperature=1.0, format="topk",
            kind_options={"top_k": demo.top_k}, codec="zstd", batch_size=demo.batch_size, device=device, overwrite=True))
        described = describe_cache(result.cache)
        caches[trained] = {"path": str(path), "soft_label_bytes": described["soft_label_bytes_per_token"] * described["num_tokens"],
                           "trained_positions": described["trained_positions"], "num_tokens": described["num_tokens"],
                           "soft_label_bytes_per_trained_token": described["soft_label_bytes_per_trained_token"]}
    students = {}
    for name, cache in (("hard labels", None), ("distilled from the assistant-only cache", caches["assistant"]["path"])):
        folder = out / f"student-{'kd' if cache else 'scratch'}"
        announce("demo-chat", f"training the student {demo.student} from {'the ' + name if cache is None else cache} -> {folder}")
        run = run_training(TrainConfig(model=demo.student, out=folder,
                                       cache=Path(cache) if cache else None, alpha=demo.alpha if cache else 0.0,
                                       epochs=demo.student_epochs, seed=demo.seed, **common))
        students[name] = {"nats_per_assistant_token": run.test_nll, "perplexity": math.exp(run.test_nll),
                          "test_tokens": run.test_tokens, "num_parameters": run.num_parameters, "seconds": run.seconds}
    masked, whole = caches["assistant"], caches["all"]
    return {
        "demo": vars(demo), "tokenized": tokenized, "caches": caches, "students": students,
        "teacher": {"nats_per_assistant_token": teacher.test_nll, "num_parameters": teacher.num_parameters},
        "assistant_share_of_tokens": masked["trained_positions"] / masked["num_tokens"],
        "masked_share_of_soft_label_bytes": masked["soft_label_bytes"] / whole["soft_label_bytes"],
        "soft_label_bytes_saved": whole["soft_label_bytes"] - masked["soft_label_bytes"],
        "seconds": time.perf_counter() - started,
    }


def chat_demo_table(report: dict) -> Table:
    demo = report["demo"]
    table = Table(title=f"pipeline demo-chat: {demo['student']} distilled from {demo['teacher']} on the assistant's tokens "
                        f"({demo['vocab']:,}-token BPE with a ChatML template, top-{demo['top_k']})")
    for column in ("", "soft-label bytes", "trained positions", "bytes / trained token", "held-out nats / assistant token"):
        table.add_column(column, justify="left" if not column else "right")
    for trained, cache in report["caches"].items():
        table.add_row(f"cache, {trained} positions trained", f"{cache['soft_label_bytes']:,.0f}", f"{cache['trained_positions']:,}",
                      f"{cache['soft_label_bytes_per_trained_token']:.1f}", "")
    for name, student in report["students"].items():
        table.add_row(f"student, {name}", "", "", "", f"{student['nats_per_assistant_token']:.4f}")
    table.add_row("teacher", "", "", "", f"{report['teacher']['nats_per_assistant_token']:.4f}", style="bold")
    table.caption = (f"assistant tokens: {100 * report['assistant_share_of_tokens']:.1f}% of the tokens; the assistant-only cache "
                     f"holds {100 * report['masked_share_of_soft_label_bytes']:.1f}% of the soft-label bytes "
                     f"({report['soft_label_bytes_saved']:,.0f} bytes saved)")
    return table
