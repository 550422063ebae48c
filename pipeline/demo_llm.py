"""`pipeline demo-llm`: language-model distillation at a real vocabulary, end to end, offline.

A byte-level BPE tokenizer of 8,192 tokens is trained on the Python standard library's sources
(pipeline.corpus.stdlib_tokenizer), and those sources are the corpus, packed into rows of `seq`
next-token targets with a held-out split of whole files. A GPT-2-style teacher is trained on a
longer stream of the same corpus (`teacher_max_tokens`: the students' rows and more, no held-out
file), its weights kept after `early_epochs` as well as at the end: two teachers of one run, an
early and the final one (`teacher_strengths`). Each is measured on the held-out tokens (its loss,
and the mass its top 8, 32 and 128 classes hold) and cached per token in every encoding: top-k for each K, the same K quantised
(qtopk at `value_bits`), and sampled for each S. A smaller GPT-2-style student is trained from
each cache and from hard labels alone, with the same epochs and paired seeds: at seed s every arm's
student starts from the same weights and sees the same batches (every cache has the same chunk
rows, so the same order at s; the hard-label arm reads a cache for that order alone, at alpha 0,
and online KD runs its teacher on that cache's batches). The reference arm is dense KD: a dense cache over the same rows, every class of every token, or, where that
would not fit (`dense_max_gib`), online KD with the teacher run in every step. Each of
`divergences` trains one more student from the dense cache (or, without one, the largest top-k
cache) with that divergence instead of forward KL (stages.divergences).

The report is the bytes-versus-quality frontier, at each teacher strength (`strengths`): for each
cache its bytes per token on disk (and for a top-k or qtopk cache the bits per kept class id), the
KL and total variation from the teacher's distribution (the dense cache's) to the cache's, over
the first `reference_rows` rows (stages.inspection.distance_from_reference), and its student's
held-out loss (nats and bits per token, perplexity; the mean over `seeds` students) against the
reference's, paired by seed: the relative difference at each seed, its mean and 95% t interval
(pipeline.paired); as well its students' KL from the teacher on the held-out tokens, paired the
same way (less noisy than the loss); and the seconds of every stage. frontier_figure draws it. `targets` checks the two figures the frontier
is judged by (see TARGETS), a quality claim only where the interval decides it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

from rich.table import Table

# The stages load torch, which `pipeline --help` must not wait for: run_llm_demo imports them.


@dataclass(frozen=True)
class LLMDemo:
    """The demo's sizes. The defaults take about 70 minutes on 2 CPU cores (the teacher about 8,
    each teacher strength's caches and students about 30; with the final teacher alone, about
    40); on a GPU, raise max_tokens, seq, the models and the epochs (`pipeline demo-llm --help`)."""

    vocab: int = 8192
    seq: int = 128
    max_tokens: int = 60_000  # of the stream cached and the students train on (the held-out stream: 25% of it, from other files)
    # The teacher's own training stream: the same documents and more of them (a document's split
    # is a hash of its text, so no held-out document is in it), for a sharper teacher.
    teacher_max_tokens: int = 240_000
    teacher: str = "gpt2:layers=4,dim=192,heads=4"
    student: str = "gpt2:layers=1,dim=32,heads=2"
    teacher_epochs: int = 4
    student_epochs: int = 4
    early_epochs: int = 1  # the early teacher: the same run's weights after this many epochs
    teacher_strengths: tuple[str, ...] = ("early", "final")  # the frontier is measured from each
    batch_size: int = 8
    seeds: int = 3  # paired seeds seed, seed + 1, ...: one student per arm and seed (about 1 minute per student and seed)
    lr: float = 2e-3
    temperature: float = 1.0
    alpha: float = 0.5  # weight of the soft labels in the students' loss (the rest: the hard targets)
    top_ks: tuple[int, ...] = (8, 32, 128)
    quantised_top_ks: tuple[int, ...] = (8, 32, 128)  # qtopk arms, at value_bits
    value_bits: int = 4
    samples: tuple[int, ...] = (12, 32)  # sampled arms: classes drawn per token
    head_tails: tuple[tuple[int, int], ...] = ((8, 12),)  # headtail arms (K, S): a qtopk head at value_bits, S tail draws
    divergences: tuple[str, ...] = ("reverse-kl", "jsd")  # arms on the reference cache with another divergence than forward KL
    reference_rows: int = 128  # rows the caches' distance from the teacher's distribution is measured over
    # The dense-KD reference: a dense cache over the same rows when its soft labels take at most
    # this many GiB (2 bytes per class per token), else online KD, the teacher run in every step.
    dense_max_gib: float = 20.0
    seed: int = 0


STRENGTHS = ("early", "final")
MASS_KS = (8, 32, 128)  # the teacher's held-out mass in its top K classes, for each K


def run_llm_demo(out: Path, demo: LLMDemo = LLMDemo(), *, device: str = "auto", teacher_weights: Path | None = None) -> dict:
    """Run every stage into `out` (replacing an earlier demo's runs there; the tokenizer and
    corpus are reused) and return the report; the frontier's figure is written to out/frontier.png."""
    from pipeline.corpus import stdlib_corpus, stdlib_tokenizer
    from pipeline.datasets import resolve_dataset
    from pipeline.demo import announce
    from stages.cache.layout import default_chunk_rows
    from stages.errors import InputError
    from stages.train_student import TrainConfig

    unknown = [s for s in demo.teacher_strengths if s not in STRENGTHS]
    if unknown or not demo.teacher_strengths:
        raise InputError(f"teacher strengths are {' and '.join(STRENGTHS)}, got {', '.join(unknown) or 'none'}")
    if teacher_weights is not None and "early" in demo.teacher_strengths:
        raise InputError("--teacher-weights gives the final teacher alone: pass --teachers final with it")
    if demo.teacher_max_tokens < demo.max_tokens:
        raise InputError(f"the teacher's stream holds the students' and more: --teacher-tokens {demo.teacher_max_tokens:,} "
                         f"is below --max-tokens {demo.max_tokens:,}")
    if not 1 <= demo.early_epochs < demo.teacher_epochs and "early" in demo.teacher_strengths:
        raise InputError(f"the early teacher's epochs must be fewer than the teacher's {demo.teacher_epochs}, got {demo.early_epochs}")
    started = time.perf_counter()
    announce("demo-llm", f"training the {demo.vocab:,}-token BPE tokenizer and collecting the corpus -> {out / f'tokenizer-{demo.vocab}'}, {out / 'corpus'}")
    tokenizer = stdlib_tokenizer(out / f"tokenizer-{demo.vocab}", demo.vocab)
    corpus = stdlib_corpus(out / "corpus")
    stream = f"corpus:{corpus.absolute()},tokenizer=hf:{tokenizer.absolute()},seq={demo.seq},test=25,max_tokens="
    dataset, teacher_dataset = stream + str(demo.max_tokens), stream + str(demo.teacher_max_tokens)
    train = resolve_dataset(dataset).split("train")
    prepared = time.perf_counter() - started
    weights = {"final": teacher_weights or out / "teacher.safetensors", "early": out / f"teacher-epoch{demo.early_epochs}.safetensors"}
    teacher_report: dict = {"spec": demo.teacher, "dataset": teacher_dataset, "epochs": demo.teacher_epochs}
    if teacher_weights is None:
        announce("demo-llm", f"training the teacher {demo.teacher} on {demo.teacher_max_tokens:,} tokens -> {weights['final']}")
        trained = train_teacher(TrainConfig(
            model=demo.teacher, dataset=teacher_dataset, out=out / "teacher.run", weights_out=weights["final"], alpha=0.0,
            epochs=demo.teacher_epochs, batch_size=demo.batch_size, lr=demo.lr, seed=demo.seed, device=device, overwrite=True,
        ), {demo.early_epochs: weights["early"]} if "early" in demo.teacher_strengths else {})
        teacher_report.update(num_parameters=trained.num_parameters, seconds=trained.seconds,
                              train_tokens=int(resolve_dataset(teacher_dataset).split("train").lengths.sum()))
    dense_gib = len(train) * demo.seq * train.num_classes * 2 / 2**30
    online = dense_gib > demo.dense_max_gib
    # One chunk size for every cache (the dense cache's own): a cache's batch order at a seed
    # depends on its chunks alone, so every arm's students see the same batches.
    chunk_rows = default_chunk_rows(demo.seq * train.num_classes * 2, len(train))
    strengths = {}
    for strength in (s for s in STRENGTHS if s in demo.teacher_strengths):
        teacher = {"epochs": demo.early_epochs if strength == "early" else demo.teacher_epochs, "weights": str(weights[strength]),
                   **teacher_measures(demo.teacher, weights[strength], dataset, MASS_KS, device)}
        strengths[strength] = {"teacher": teacher,
                               **_frontier(out / strength, demo, dataset, weights[strength], online, chunk_rows, device)}
    report = {
        "dataset": dataset, "demo": {k: list(v) if isinstance(v, tuple) else v for k, v in vars(demo).items()},
        "train_tokens": int(train.lengths.sum()), "dense_cache_gib": dense_gib,
        "reference": "online KD (the teacher run in every step)" if online else "dense cache",
        "teacher": teacher_report, "strengths": strengths, "prepare_seconds": prepared,
    }
    report["figure"] = str(out / "frontier.png")
    frontier_figure(report, out / "frontier.png")
    report["seconds"] = time.perf_counter() - started
    return report


# Each student arm: its name, the cache arm it trains from (None: none of its own) and its divergence
# (None: forward KL). New arms are new entries of _arms (caches) or of these (students without one).
HARD_LABELS, ONLINE_KD = "hard labels", "online KD"


def _frontier(out: Path, demo: LLMDemo, dataset: str, teacher_weights: Path, online: bool, chunk_rows: int, device: str) -> dict:
    """Cache the teacher at `teacher_weights` in every encoding under `out`, train every arm's
    students from the caches at each seed, and measure them: the frontier at one teacher strength."""
    from pipeline.demo import announce, run_online_training
    from pipeline.jobs import run_caching, run_training
    from pipeline.paired import paired, verdict
    from stages import divergences
    from stages.cache_teacher import CacheTeacherConfig
    from stages.divergences import DEFAULT as DEFAULT_DIVERGENCE
    from stages.inspection import describe_cache, distance_from_reference
    from stages.train_student import TrainConfig

    caches = {}
    for name, encoding in _arms(demo, online).items():
        path = out / f"{_slug(name)}.zarr"
        announce("demo-llm", f"caching the teacher as {name} -> {path}")
        result = run_caching(CacheTeacherConfig(
            teacher=demo.teacher, teacher_weights=teacher_weights, dataset=dataset, out=path, temperature=demo.temperature,
            batch_size=demo.batch_size, chunk_rows=chunk_rows, device=device, overwrite=True, **encoding,
        ))
        described = describe_cache(result.cache)
        caches[name] = {"path": str(result.cache), "format": encoding["format"], "top_k": encoding["kind_options"].get("top_k"),
                        "bytes_per_token": described["bytes_per_token"],
                        "bits_per_class_id": described.get("bits_per_class_id"),
                        "mean_tail_mass": described.get("tail_mass", {}).get("mean"),
                        "encoding_error": described.get("encoding_error"), "seconds": result.seconds}
    if not online:  # how far each cache's distribution is from the teacher's (the dense cache holds it)
        for cache in caches.values():
            cache["against_teacher"] = distance_from_reference(Path(cache["path"]), Path(caches["dense"]["path"]), demo.reference_rows)
    # (student arm, cache arm it trains from, divergence); "online KD" and "hard labels" have no cache.
    arms = [(name, name, DEFAULT_DIVERGENCE) for name in (HARD_LABELS, *caches, *((ONLINE_KD,) if online else ()))]
    on = "dense" if "dense" in caches else max((n for n, c in caches.items() if c["format"] == "topk"), key=lambda n: caches[n]["top_k"],
                                                default=None)
    arms += [(f"{on}, {divergences.parse(d).spec}", on, d) for d in demo.divergences if on is not None]
    # The batch order of every arm without a cache of its own: a cache cheap to compute the
    # (unweighted) soft term from, a sampled one where there is one.
    order = Path(caches[min(caches, key=lambda n: (caches[n]["format"] != "sampled", caches[n]["bytes_per_token"]))]["path"])
    seeds = range(demo.seed, demo.seed + demo.seeds)
    students, weights = {}, {}
    for name, cache_name, divergence in arms:
        cache = caches.get(cache_name)
        runs = []
        for seed in seeds:
            config = TrainConfig(
                model=demo.student, dataset=dataset, out=out / f"student-{_slug(name)}-s{seed}",
                cache=Path(cache["path"]) if cache else order if name == HARD_LABELS else None,
                alpha=demo.alpha if name != HARD_LABELS else 0.0, temperature=demo.temperature, divergence=divergence,
                epochs=demo.student_epochs, batch_size=demo.batch_size, lr=demo.lr, seed=seed, device=device, overwrite=True,
            )
            announce("demo-llm", f"seed {seed}: training the student {demo.student} from {name} -> {config.out}")
            runs.append(run_online_training(config, demo.teacher, teacher_weights, demo.temperature, order=order)
                        if name == ONLINE_KD else run_training(config))
        run = runs[0]
        weights[name] = [r.weights for r in runs]
        students[name] = {**_loss(sum(r.test_nll for r in runs) / len(runs)), "nats_per_token_by_seed": [r.test_nll for r in runs],
                          "test_tokens": run.test_tokens, "num_parameters": run.num_parameters,
                          **{key: (cache or {}).get(key) for key in ("format", "top_k", "bytes_per_token", "bits_per_class_id",
                                                                     "mean_tail_mass", "encoding_error")},
                          "divergence": divergences.parse(divergence).spec if cache or name == ONLINE_KD else None,
                          "kl_from_teacher": (cache or {}).get("against_teacher", {}).get("kl_nats"),
                          "total_variation_from_teacher": (cache or {}).get("against_teacher", {}).get("total_variation"),
                          "cache_seconds": cache["seconds"] if cache else None, "seconds": sum(r.seconds for r in runs) / len(runs)}
    announce("demo-llm", f"measuring every student's KL from the teacher on the held-out tokens ({len(arms) * len(seeds)} students)")
    for name, by_seed in _students_kl(demo, dataset, teacher_weights, weights, device).items():
        students[name].update(student_kl_nats=sum(by_seed) / len(by_seed), student_kl_nats_by_seed=by_seed)
    reference = ONLINE_KD if online else "dense"
    comparisons, by_seed = {}, {}
    for measure, key in (("nats_per_token", "paired_vs_reference"), ("student_kl_nats", "paired_kl_vs_reference")):
        by_seed[measure] = {name: dict(zip(seeds, s[f"{measure}_by_seed"], strict=True)) for name, s in students.items()}
        comparisons[measure] = {name: paired(name, values, reference, by_seed[measure][reference], relative=True)
                                for name, values in by_seed[measure].items()}
        for name, student in students.items():
            student[key] = comparisons[measure][name].as_dict()
    losses = by_seed["nats_per_token"]
    for name, student in students.items():
        student["vs_reference_loss"] = student["nats_per_token"] / students[reference]["nats_per_token"]
        against_hard = paired(name, losses[name], HARD_LABELS, losses[HARD_LABELS], relative=True)
        student["beats_hard_labels"] = None if name == HARD_LABELS else verdict(against_hard, below="yes", above="no: worse")
    frontier = {"students": students,
                "every_cache_beats_hard_labels": all(s["beats_hard_labels"] == "yes" for n, s in students.items() if n != HARD_LABELS)}
    if "top-32" in students:
        frontier["top32_vs_reference_loss"] = students["top-32"]["vs_reference_loss"]
    frontier["targets"] = _targets(students, comparisons["nats_per_token"])
    return frontier


def _students_kl(demo: LLMDemo, dataset: str, teacher_weights: Path, weights: dict[str, list[Path]], device: str) -> dict[str, list[float]]:
    """Each student's mean KL(teacher || student) on the held-out tokens, by arm and seed: the
    teacher runs once over them for all the students."""
    from pipeline.datasets import resolve_dataset
    from pipeline.models import resolve_model
    from stages.data import input_shape
    from stages.evaluation import kl_from_reference
    from stages.runtime import resolve_device

    held_out = resolve_dataset(dataset).split("test")
    on, shape = resolve_device(device), input_shape(held_out)
    teacher = resolve_model(demo.teacher, num_classes=held_out.num_classes, input_shape=shape, weights=teacher_weights).to(on)
    students = [resolve_model(demo.student, num_classes=held_out.num_classes, input_shape=shape, weights=path).to(on)
                for paths in weights.values() for path in paths]
    kl = iter(kl_from_reference(teacher, students, held_out, on))
    return {name: [next(kl) for _ in paths] for name, paths in weights.items()}


# What the frontier is judged by (issue 17): a cache of at most 40 bytes per token whose student's
# held-out loss is within 1% of the dense-KD reference's (the upper end of the paired interval at
# most +1%); a top-128 encoding smaller than DistillKit's at the same K. DistillKit's compressed
# top-k logits take about 105-114 bytes per token at its k=50 "budget" setting and about 290-300
# at its k=128 "recommended" one, measured at a 32k vocabulary (15-bit packed ids, an exact bf16
# head and a polynomial fit of the rest, no tail stored); at smaller vocabularies it packs 16-bit
# ids, so its k=128 takes no less there. Side by side on 8,192 tokens of a 32k-vocabulary teacher:
# qtopk 4-bit K=128 74 B/token (KL 0.691) against its recommended 291 B (KL 0.788), qtopk K=50
# 36 B (KL 1.094) against its budget 105 B (KL 1.105). qtopk's ids are stored as deltas, so how
# small they get depends on how diverse a teacher's top-k sets are: 1.4-1.7 bits an id for a weak
# teacher repeating its sets there, and only 1.02-1.12x less than DistillKit with ids as diverse
# as a random subset.
TARGETS = {"small_cache_bytes": 40.0, "small_cache_loss_margin": 0.01, "top128_bytes": 291.0}


def _targets(students: dict, comparisons: dict) -> dict:
    """Whether each target is met, and by which arms: "met" is None where no arm of its kind ran;
    for the loss target, also where no small arm's interval decided it ("verdicts" says which).
    `comparisons`: each arm's paired.Paired against the reference."""
    from pipeline.paired import resolved, verdict

    caches = {name: s for name, s in students.items()
              if s["bytes_per_token"] is not None and s["format"] != "dense" and s["divergence"] == "forward-kl"}
    small = [name for name, s in caches.items() if s["bytes_per_token"] <= TARGETS["small_cache_bytes"]]
    verdicts = {name: verdict(comparisons[name], below="met", above="missed", margin=TARGETS["small_cache_loss_margin"])
                for name in small}
    close = [name for name, v in verdicts.items() if v == "met"]
    decided = bool(close) or (bool(small) and all(resolved(v) for v in verdicts.values()))
    top128 = {name: s["bytes_per_token"] for name, s in caches.items() if s["top_k"] == 128}
    return {
        "small_cache_within_1pct": {"met": bool(close) if decided else None, "arms": close, "small_arms": small, "verdicts": verdicts},
        "top128_below_distillkit": {"met": min(top128.values()) < TARGETS["top128_bytes"] if top128 else None,
                                    "bytes_per_token": top128},
    }


def _arms(demo: LLMDemo, online: bool) -> dict[str, dict]:
    """Each cache arm's name and its encoding (CacheTeacherConfig fields), smallest families first."""
    arms = {f"top-{k}": {"format": "topk", "kind_options": {"top_k": k}} for k in demo.top_ks}
    arms.update({f"top-{k} {demo.value_bits}-bit": {"format": "qtopk", "kind_options": {"top_k": k, "value_bits": demo.value_bits}}
                 for k in demo.quantised_top_ks})
    arms.update({f"sampled S={s}": {"format": "sampled", "kind_options": {"samples": s}} for s in demo.samples})
    arms.update({f"head-{k} tail S={s}": {"format": "headtail", "kind_options": {"top_k": k, "value_bits": demo.value_bits, "samples": s}}
                 for k, s in demo.head_tails})
    if not online:
        arms["dense"] = {"format": "dense", "kind_options": {}}
    return arms


def _slug(name: str) -> str:
    """An arm's name as a file name: "top-32 4-bit" -> "top-32-4-bit", "sampled S=12" -> "sampled-S12",
    "dense, jsd:0.5" -> "dense-jsd0.5"."""
    return name.replace(", ", "-").replace(" ", "-").replace("=", "").replace(":", "")


def _loss(nats: float) -> dict:
    return {"nats_per_token": nats, "bits_per_token": nats / math.log(2), "perplexity": math.exp(nats)}


def llm_demo_table(report: dict) -> Table:
    """The frontier at each teacher strength, a section each, with the teacher's row last."""
    from pipeline.paired import CONFIDENCE, interval_text

    demo = report["demo"]
    table = Table(title=f"pipeline demo-llm: {demo['student']} distilled from {demo['teacher']} over the standard library "
                        f"({demo['vocab']:,}-token BPE, T={demo['temperature']:g}, alpha={demo['alpha']:g}); figure: {report['figure']}")
    seeds = demo.get("seeds", 1)
    mean = f" (mean of {seeds} seeds)" if seeds > 1 else ""
    against = f"vs reference, paired ({CONFIDENCE:.0%} interval)"
    columns = ("student trained from", "cache bytes/token", "bits/id", "KL(teacher || cache)", "total variation", f"held-out nats/token{mean}",
               *(("by seed",) if seeds > 1 else ()), against, f"KL(teacher || student){mean}", f"its {against}", "beats hard labels",
               "bits/token", "perplexity", "cache s", "train s")
    for column in columns:
        table.add_column(column, justify="left" if column == "student trained from" else "right")
    for strength, frontier in report["strengths"].items():
        for name, s in frontier["students"].items():
            kl, tv, bits = s["kl_from_teacher"], s["total_variation_from_teacher"], s["bits_per_class_id"]
            reference = name in ("dense", ONLINE_KD)
            table.add_row(f"{strength}: {name}" + (" (dense-KD reference)" if reference else ""),
                          "" if s["bytes_per_token"] is None else f"{s['bytes_per_token']:,.1f}", "" if bits is None else f"{bits:.2f}",
                          "" if tv is None else "inf" if kl is None else f"{kl:.4f}", "" if tv is None else f"{tv:.4f}",
                          f"{s['nats_per_token']:.4f}", *((" / ".join(f"{n:.3f}" for n in s["nats_per_token_by_seed"]),) if seeds > 1 else ()),
                          "0" if reference else interval_text(s["paired_vs_reference"], scale=100, unit="%"), f"{s['student_kl_nats']:.4f}",
                          "0" if reference else interval_text(s["paired_kl_vs_reference"], scale=100, unit="%"),
                          "" if name == HARD_LABELS else s["beats_hard_labels"], f"{s['bits_per_token']:.4f}", f"{s['perplexity']:.2f}",
                          "" if s["cache_seconds"] is None else f"{s['cache_seconds']:.0f}", f"{s['seconds']:.0f}")
        teacher = frontier["teacher"]
        masses = "/".join(f"{100 * m:.0f}" for m in teacher["top_mass"].values())
        seconds = report["teacher"].get("seconds")
        table.add_row(f"{strength} teacher: {teacher['epochs']} of {report['teacher']['epochs']} epochs; held-out top-"
                      f"{'/'.join(teacher['top_mass'])} mass {masses}%", "", "", "", "", f"{teacher['nats_per_token']:.4f}",
                      *(("",) if seeds > 1 else ()), "", "", "", "", f"{teacher['bits_per_token']:.4f}", f"{teacher['perplexity']:.2f}", "",
                      "" if seconds is None or strength != "final" else f"{seconds:.0f}", style="bold",  # the whole run's seconds
                      end_section=True)
    table.caption = "; ".join(
        f"{strength}: {TARGETS['small_cache_bytes']:g} B/token or less and within 1% of the reference (upper end of the interval): "
        f"{_small_verdict(f['targets']['small_cache_within_1pct'], seeds)}; top-128 below DistillKit's k=128 "
        f"({TARGETS['top128_bytes']:g} B/token): {_verdict(f['targets']['top128_below_distillkit'])}" for strength, f in report["strengths"].items())
    return table


def frontier_figure(report: dict, path: Path) -> list[str]:
    """Write the frontier as a PNG at `path`: per teacher strength, each cache arm's bytes per
    token (log scale) against its student's paired loss difference from the reference, and against
    its student's paired KL-from-teacher difference, with their intervals (the arms without a
    cache: dashed lines); and each cache's KL and total variation from the teacher's distribution.
    Returns the panels' titles."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from stages.storage import open_no_follow

    figure, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    for (strength, frontier), colour in zip(report["strengths"].items(), ("tab:orange", "tab:blue"), strict=False):
        students = frontier["students"]
        cached = {n: s for n, s in students.items() if s["bytes_per_token"] is not None}
        for ax, key in ((axes[0], "paired_vs_reference"), (axes[1], "paired_kl_vs_reference")):
            for name, s in students.items():
                c = s[key]
                low, high = (c["low"], c["high"]) if c["low"] is not None else (c["mean"], c["mean"])
                if name in cached:
                    ax.errorbar(s["bytes_per_token"], 100 * c["mean"], yerr=[[100 * (c["mean"] - low)], [100 * (high - c["mean"])]],
                                fmt="o", color=colour, capsize=3, label=strength if name == next(iter(cached)) else None)
                    ax.annotate(name, (s["bytes_per_token"], 100 * c["mean"]), fontsize=6, xytext=(3, 3), textcoords="offset points")
                else:
                    ax.axhline(100 * c["mean"], color=colour, linestyle="--", linewidth=0.8)
                    ax.annotate(f"{strength}: {name}", (0.01, 100 * c["mean"]), xycoords=("axes fraction", "data"), fontsize=6)
        names = [n for n, s in cached.items() if s["total_variation_from_teacher"] is not None]
        if not names:  # online KD as the reference: nothing measured against the teacher's distribution
            continue
        axes[2].scatter([cached[n]["bytes_per_token"] for n in names], [cached[n]["total_variation_from_teacher"] for n in names],
                        marker="s", color=colour, label=f"{strength}: total variation")
        with_kl = [n for n in names if cached[n]["kl_from_teacher"] is not None]
        axes[2].scatter([cached[n]["bytes_per_token"] for n in with_kl], [cached[n]["kl_from_teacher"] for n in with_kl],
                        marker="^", color=colour, facecolors="none", label=f"{strength}: KL (nats)")
    titles = ["student's held-out loss vs the reference", "student's KL from the teacher vs the reference", "cache vs the teacher's distribution"]
    for ax, title, ylabel in zip(axes, titles, ("paired difference (%)", "paired difference (%)", "KL (nats), total variation"), strict=True):
        ax.set_xlabel("cache bytes per token")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        if ax.get_legend_handles_labels()[0]:  # points placed: bytes per token over decades
            ax.set_xscale("log")
            ax.legend(fontsize=7)
    if axes[2].get_legend_handles_labels()[0]:
        axes[2].set_yscale("symlog", linthresh=1e-3)  # the dense cache at 0, the others over decades
        axes[2].set_ylim(bottom=0)
    else:  # online KD as the reference: no dense cache holds the teacher's distribution
        axes[2].text(0.5, 0.5, "no dense cache to measure the caches against", ha="center", transform=axes[2].transAxes, fontsize=8)
    demo = report["demo"]
    figure.suptitle(f"demo-llm: {demo['student']} from {demo['teacher']}, {demo['seeds']} paired seeds "
                    f"({report['reference']} as reference)", fontsize=10)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open_no_follow(path, "wb") as file:
        figure.savefig(file, format="png", dpi=110)
    plt.close(figure)
    return titles


def _small_verdict(target: dict, seeds: int) -> str:
    if target["met"] is None and target["small_arms"]:
        return f"not resolved at {seeds} seed{'s' if seeds != 1 else ''}"
    return _verdict(target) + (f" by {', '.join(target['arms'])}" if target["met"] else "")


def _verdict(target: dict) -> str:
    return "not measured" if target["met"] is None else "met" if target["met"] else "missed"


def train_teacher(config, keep: dict[int, Path]):
    """Train the teacher as run_training does (the model's initial weights drawn at the run's
    seed), also writing its weights after each epoch of `keep` ({epoch: path}): the early
    checkpoints of the same run, whose schedule runs over all its epochs."""
    from pipeline.datasets import resolve_dataset
    from pipeline.models import resolve_model
    from stages import train_student
    from stages.data import input_shape
    from stages.runtime import seed_everything
    from stages.weights import save_weights

    data = resolve_dataset(config.dataset)
    train = data.split(config.split)
    seed_everything(config.seed)
    model = resolve_model(config.model, num_classes=train.num_classes, input_shape=input_shape(train))

    def after_step(step: int, total: int) -> None:
        # Every epoch takes as many optimizer steps (no max_steps): an epoch ends where step * epochs is a multiple of total.
        if step and step * config.epochs % total == 0 and step * config.epochs // total in keep:
            save_weights(model, keep[step * config.epochs // total])

    return train_student.run(config, model, train, data.split(config.eval_split), progress=after_step)


def teacher_measures(spec: str, weights: Path, dataset: str, top_ks: tuple[int, ...], device: str = "auto") -> dict:
    """A trained teacher's held-out loss and the mean probability mass of its top K classes there,
    for each K of `top_ks` (how much of its distribution a top-K cache keeps)."""
    from pipeline.datasets import resolve_dataset
    from pipeline.models import resolve_model
    from stages.data import input_shape
    from stages.evaluation import evaluate, top_mass
    from stages.runtime import resolve_device

    held_out = resolve_dataset(dataset).split("test")
    on = resolve_device(device)
    model = resolve_model(spec, num_classes=held_out.num_classes, input_shape=input_shape(held_out), weights=weights).to(on)
    return {**_loss(evaluate(model, held_out, on, 64)["nll"]),
            "top_mass": {str(k): mass for k, mass in top_mass(model, held_out, on, top_ks).items()}}
