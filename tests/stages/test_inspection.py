"""Describing a cache (stages.inspection): its layout and disk figures, and the statistics of its
soft labels (calibration, reliability diagram, histograms of confidence and entropy), each
checked against numpy computed by hand from the stored arrays of a real cache."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch
import zarr

from pipeline.datasets import resolve_dataset
from pipeline.models import resolve_model
from stages import cache_teacher
from stages.data import TensorSplit
from stages.inspection import CALIBRATION_BINS, HISTOGRAM_BINS, describe_cache
from tests.conftest import CHUNK_ROWS, DATASET, SHARD_ROWS, TEMPERATURE


# mlp-64 on 8 features and 4 classes: two hidden layers of 64 units, weights and biases.
TEACHER_PARAMETERS = (8 * 64 + 64) + (64 * 64 + 64) + (64 * 4 + 4)


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(-1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(-1, keepdims=True)


def _dense_probabilities(path, t: float) -> np.ndarray:
    """The teacher's softmax at temperature t from a dense cache, which stores logits / T."""
    group = zarr.open_group(str(path), mode="r")
    return _softmax(group["logits"][:].astype(np.float64) * (group.attrs["temperature"] / t))


def _reliability(confidence: np.ndarray, right: np.ndarray) -> dict:
    bins = np.minimum((confidence * CALIBRATION_BINS).astype(int), CALIBRATION_BINS - 1)
    count = np.array([(bins == b).sum() for b in range(CALIBRATION_BINS)])
    accuracy = [right[bins == b].mean() if count[b] else np.nan for b in range(CALIBRATION_BINS)]
    mean_confidence = [confidence[bins == b].mean() if count[b] else np.nan for b in range(CALIBRATION_BINS)]
    ece = sum(abs(right[bins == b].sum() - confidence[bins == b].sum()) for b in range(CALIBRATION_BINS)) / len(confidence)
    return {"count": count, "accuracy": np.array(accuracy), "confidence": np.array(mean_confidence), "ece": ece}


def _entropy(p: np.ndarray) -> np.ndarray:
    return -(p * np.log(np.where(p > 0, p, 1.0))).sum(-1)


def _files_under(path) -> int:
    return sum(os.path.getsize(os.path.join(folder, name)) for folder, _, names in os.walk(path) for name in names)


def test_the_report_describes_the_layout_as_recorded(cache_path):
    report = describe_cache(cache_path)
    attrs = dict(zarr.open_group(str(cache_path), mode="r").attrs)
    assert (report["kind"], report["num_samples"], report["num_classes"], report["chunk_rows"]) == ("dense", 600, 4, CHUNK_ROWS)
    assert report["temperature"] == TEMPERATURE and report["complete"] is True and report["dtype"] == "float16"
    assert report["row_shape"] == [4] and "top_k" not in report and report["views"] is None
    assert report["dataset"] == f"{DATASET} split train" and report["teachers"] == f"mlp-64 ({TEACHER_PARAMETERS} parameters)"
    assert report["teacher_metrics"] == attrs["teacher_metrics"] and report["schema_version"] == attrs["schema_version"]


@pytest.mark.parametrize(("cache", "shard_rows"), [("cache_path", None), ("sharded_cache_path", SHARD_ROWS)])
def test_the_report_gives_the_sharding_and_the_files_the_cache_is(request, cache, shard_rows):
    path = request.getfixturevalue(cache)
    report = describe_cache(path)
    assert (report["chunk_rows"], report["shard_rows"]) == (CHUNK_ROWS, shard_rows)
    assert report["objects"] == sum(1 for file in path.rglob("*") if file.is_file())
    # the group's and 5 arrays' zarr.json (chunk_manifest too), and a file per write unit of each array: 10 chunks or 5 shards
    assert report["objects"] == 6 + 5 * (10 if shard_rows is None else 5)


def test_disk_figures_are_the_bytes_of_the_files_under_each_array(cache_path):
    report = describe_cache(cache_path)
    group = zarr.open_group(str(cache_path), mode="r")
    per_array = {name: _files_under(cache_path / name) for name in group.array_keys()}
    assert report["bytes_per_array"] == per_array and per_array["logits"] > 0
    assert report["bytes_on_disk"] == _files_under(cache_path)
    assert report["bytes_per_row"] == pytest.approx(_files_under(cache_path) / 600)
    assert report["soft_label_bytes_per_row"] == pytest.approx(per_array["logits"] / 600)


@pytest.mark.parametrize("t", [TEMPERATURE, 1.0])
def test_reliability_diagram_per_bin_matches_numpy(cache_path, t):
    report = describe_cache(cache_path)
    labels = zarr.open_group(str(cache_path), mode="r")["labels"][:]
    p = _dense_probabilities(cache_path, t)
    confidence, right = p.max(1), p.argmax(1) == labels
    expected = _reliability(confidence, right)
    entry = report["calibration"][f"T={t:g}"]
    diagram = entry["reliability"]
    assert diagram["bin_edges"] == pytest.approx(np.linspace(0, 1, CALIBRATION_BINS + 1))
    assert diagram["count"] == expected["count"].tolist() and sum(diagram["count"]) == 600
    np.testing.assert_allclose(diagram["accuracy"], expected["accuracy"], rtol=1e-9)  # NaN in the same empty bins
    np.testing.assert_allclose(diagram["confidence"], expected["confidence"], rtol=1e-9)
    assert entry["mean_confidence"] == pytest.approx(confidence.mean())
    assert entry["ece"] == pytest.approx(expected["ece"])
    assert (expected["count"] > 0).sum() >= 3  # the rows spread over several bins: a per-bin mistake would show


def test_histograms_of_confidence_and_entropy_at_the_caches_temperature_match_numpy(cache_path):
    report = describe_cache(cache_path)
    p = _dense_probabilities(cache_path, TEMPERATURE)
    confidence = report["histograms"]["max_probability"]
    entropy = report["histograms"]["entropy_nats"]
    assert confidence["temperature"] == TEMPERATURE == entropy["temperature"]
    assert confidence["count"] == np.histogram(p.max(1), bins=HISTOGRAM_BINS, range=(0, 1))[0].tolist()
    assert confidence["bin_edges"] == pytest.approx(np.linspace(0, 1, HISTOGRAM_BINS + 1))
    expected = np.histogram(_entropy(p), bins=HISTOGRAM_BINS, range=(0, np.log(4)))[0]
    assert entropy["count"] == expected.tolist() and (expected > 0).sum() >= 3
    assert entropy["bin_edges"] == pytest.approx(np.linspace(0, np.log(4), HISTOGRAM_BINS + 1))
    assert entropy["of"] == "the full distribution"


def test_a_topk_cache_is_calibrated_at_its_own_temperature_only_with_its_kept_classes_and_tail(tmp_path, teacher_weights):
    split = resolve_dataset(DATASET).split("train")
    teacher = resolve_model("mlp-64", num_classes=4, input_shape=(8,), weights=teacher_weights)
    config = cache_teacher.CacheTeacherConfig(teacher="mlp-64", dataset=DATASET, out=tmp_path / "top2.zarr", temperature=TEMPERATURE,
                                              chunk_rows=CHUNK_ROWS, device="cpu", format="topk", kind_options={"top_k": 2})
    path = cache_teacher.run(config, teacher, split).cache
    report = describe_cache(path)
    group = zarr.open_group(str(path), mode="r")
    kept = np.exp(group["topk_values"][:].astype(np.float64) - group["logsumexp"][:][:, None])
    with_tail = np.concatenate([kept, np.clip(1 - kept.sum(1, keepdims=True), 0, 1)], axis=1)
    confidence, right = kept[:, 0], group["topk_indices"][:, 0] == group["labels"][:]
    assert list(report["calibration"]) == [f"T={TEMPERATURE:g}"]  # at T=1 the tail's mass is unknown
    entry = report["calibration"][f"T={TEMPERATURE:g}"]
    assert entry["ece"] == pytest.approx(_reliability(confidence, right)["ece"])
    assert entry["accuracy"] == pytest.approx(right.mean()) and entry["mean_confidence"] == pytest.approx(confidence.mean())
    assert "nll" not in entry  # the label's probability is unknown where the label is in the tail
    assert report["histograms"]["max_probability"]["count"] == np.histogram(confidence, bins=HISTOGRAM_BINS, range=(0, 1))[0].tolist()
    assert report["histograms"]["entropy_nats"]["count"] == \
        np.histogram(_entropy(with_tail), bins=HISTOGRAM_BINS, range=(0, np.log(4)))[0].tolist()
    assert report["histograms"]["entropy_nats"]["of"] == "the kept classes and the tail (a lower bound)"


def test_an_unlabeled_cache_reports_confidence_but_no_accuracy(tmp_path, teacher_weights):
    train = resolve_dataset(DATASET).split("train")
    unlabeled = TensorSplit("transfer", train.inputs(np.arange(150)), None, None)
    teacher = resolve_model("mlp-64", num_classes=4, input_shape=(8,), weights=teacher_weights)
    config = cache_teacher.CacheTeacherConfig(teacher="mlp-64", dataset="transfer", out=tmp_path / "u.zarr",
                                              temperature=TEMPERATURE, chunk_rows=CHUNK_ROWS, device="cpu", num_classes=4)
    path = cache_teacher.run(config, teacher, unlabeled).cache
    report = describe_cache(path)
    assert set(report["calibration"]) == {f"T={TEMPERATURE:g}", "T=1"}
    for t in (TEMPERATURE, 1.0):
        entry = report["calibration"][f"T={t:g}"]
        assert set(entry) == {"mean_confidence"}
        assert entry["mean_confidence"] == pytest.approx(_dense_probabilities(path, t).max(1).mean())
    assert sum(report["histograms"]["max_probability"]["count"]) == 150 and report["teacher_metrics"] is None


def test_a_view_cache_counts_every_view_against_its_samples_label(tmp_path):
    digits = resolve_dataset("digits").split("train")
    split = TensorSplit("train", digits.inputs(np.arange(200)), digits.labels[:200], 10)
    torch.manual_seed(0)
    teacher = resolve_model("mlp-64", num_classes=10, input_shape=(1, 8, 8))  # untrained: its views disagree
    config = cache_teacher.CacheTeacherConfig(teacher="mlp-64", dataset="digits", out=tmp_path / "v.zarr", temperature=2.0,
                                              chunk_rows=64, device="cpu", augment="shift:1", views=3, dtype="float32")
    path = cache_teacher.run(config, teacher, split).cache
    report = describe_cache(path)
    group = zarr.open_group(str(path), mode="r")
    p = _softmax(group["logits"][:].astype(np.float64)).reshape(600, 10)  # (200 samples x 3 views, classes) at T
    right = p.argmax(1) == np.repeat(group["labels"][:], 3)
    assert (right.reshape(200, 3).any(1) != right.reshape(200, 3).all(1)).any()  # views of a sample differ in being right
    entry = report["calibration"]["T=2"]
    assert report["views"] == 3 and sum(entry["reliability"]["count"]) == 600
    assert entry["accuracy"] == pytest.approx(right.mean()) and entry["ece"] == pytest.approx(_reliability(p.max(1), right)["ece"])


def test_an_incomplete_cache_is_described_without_statistics_of_unwritten_rows(cache_path, tmp_path):
    copy = tmp_path / "partial.zarr"
    shutil.copytree(cache_path, copy)
    group = zarr.open_group(str(copy), mode="r+")
    group["chunk_done"][3] = 0  # as if killed before chunk 3 was written
    group["logits"][192:256] = np.nan
    group.attrs["complete"] = False
    report = describe_cache(copy)
    assert report["complete"] is False and report["num_samples"] == 600
    assert "calibration" not in report and "histograms" not in report
    assert report["bytes_on_disk"] == _files_under(copy)


def test_inspect_against_a_dense_reference_gives_each_kinds_kl_and_total_variation_from_the_teachers_distribution(tmp_path, teacher_weights):
    """`inspect --reference DENSE`: the cache's distribution over every class (its kept classes,
    the rest of the mass spread evenly over the others) against the dense cache's, both computed
    here by hand from the stored arrays of real caches of one teacher."""
    from tests.conftest import cache_with_cli, invoke, invoke_json

    dense = cache_with_cli(tmp_path / "dense.zarr", teacher_weights)["cache"]
    topk = cache_with_cli(tmp_path / "top2.zarr", teacher_weights, "--format", "topk", "--top-k", 2)["cache"]
    sampled = cache_with_cli(tmp_path / "s.zarr", teacher_weights, "--format", "sampled", "--samples", 3)["cache"]
    p = _dense_probabilities(dense, TEMPERATURE)
    rows = min(40, len(p))

    itself = invoke_json("inspect", dense, "--reference", dense)["against_reference"]
    assert itself["kl_nats"] == pytest.approx(0, abs=1e-12) and itself["positions"] == len(p)

    group = zarr.open_group(str(topk), mode="r")
    kept = np.exp(group["topk_values"][:].astype(np.float64) - group["logsumexp"][:][:, None])
    completed = np.broadcast_to(((1 - kept.sum(-1)) / (p.shape[1] - 2))[:, None], p.shape).copy()
    np.put_along_axis(completed, group["topk_indices"][:].astype(np.int64), kept, -1)
    kl = (p * np.log(p / completed)).sum(-1)[:rows].mean()
    measured = invoke_json("inspect", topk, "--reference", dense, "--reference-rows", rows)["against_reference"]
    assert measured["positions"] == rows and measured["kl_nats"] == pytest.approx(kl, rel=1e-6) and kl > 1e-3
    assert measured["total_variation"] == pytest.approx(0.5 * np.abs(p - completed).sum(-1)[:rows].mean(), rel=1e-6)

    # Three draws of four classes leave a class undrawn in every row the teacher gives all four some mass.
    drawn = invoke_json("inspect", sampled, "--reference", dense)["against_reference"]
    group = zarr.open_group(str(sampled), mode="r")
    estimate = np.zeros_like(p)
    np.add.at(estimate, (np.arange(len(p))[:, None], group["sampled_ids"][:].astype(np.int64)), group["sampled_counts"][:] / 3)
    assert drawn["kl_nats"] is None and drawn["infinite_kl_positions"] == ((estimate == 0) & (p > 0)).any(-1).sum() > 0
    assert drawn["total_variation"] == pytest.approx(0.5 * np.abs(p - estimate).sum(-1).mean(), rel=1e-6)

    code, _, err = invoke("inspect", dense, "--reference", topk)
    assert code == 2 and "must be a dense cache" in err and len(err.strip().splitlines()) == 1, err
    other = cache_with_cli(tmp_path / "test.zarr", teacher_weights, "--split", "test")["cache"]
    code, _, err = invoke("inspect", topk, "--reference", other)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "cannot be compared" in err and "dataset: " in err and "split 'test' in the reference" in err and "teacher:" not in err, err
    code, _, err = invoke("cache-teacher", "--teacher", "mlp-64", "--dataset", DATASET, "--temperature", TEMPERATURE,
                          "--chunk-rows", CHUNK_ROWS, "--device", "cpu", "--out", tmp_path / "untrained.zarr")
    assert code == 0, err
    code, _, err = invoke("inspect", topk, "--reference", tmp_path / "untrained.zarr")
    assert code == 2 and "teacher: " in err and "weights_sha256 differ" in err and "dataset:" not in err, err


def test_inspect_against_a_dense_reference_of_a_slice_compares_the_rows_both_hold(tmp_path):
    """A dense cache of the whole split is often too large: a dense cache of a slice of a token
    dataset's rows (rows=10:50) is the reference for a qtopk cache of every row, compared on those
    40 rows by dataset row, and the other way round; what cannot be compared is named."""
    pytest.importorskip("transformers")
    from pipeline.corpus import stdlib_corpus, stdlib_tokenizer
    from stages.weights import save_weights
    from tests.conftest import invoke, invoke_json

    corpus = tmp_path / "small.jsonl"  # the first 4 documents (12 KB): over a hundred rows of 32 tokens, enough past row 50
    corpus.write_text("\n".join(stdlib_corpus(tmp_path).read_text(encoding="utf-8").splitlines()[:4]) + "\n", encoding="utf-8")
    tokenizer = stdlib_tokenizer(tmp_path / "tok", vocab=512)
    invoke_json("tokenize", f"corpus:{corpus},tokenizer=hf:{tokenizer},seq=32,test=0", "--out", tmp_path / "t.zarr")
    teacher, weights = "gpt2:layers=1,dim=16,heads=2", tmp_path / "teacher.safetensors"
    torch.manual_seed(0)
    save_weights(resolve_model(teacher, num_classes=512, input_shape=(32,)), weights)

    def cache(out, rows="", *options):
        return invoke_json("cache-teacher", "--teacher", teacher, "--teacher-weights", weights, "--dataset",
                           f"tokens:{tmp_path / 't.zarr'}{rows}", "--temperature", 2, "--device", "cpu", "--out", out, *options)["cache"]

    whole = cache(tmp_path / "qtopk.zarr", "", "--format", "qtopk", "--top-k", 8)
    dense_whole = cache(tmp_path / "dense.zarr")
    dense = cache(tmp_path / "dense-10-50.zarr", ",rows=10:50")
    measured = invoke_json("inspect", whole, "--reference", dense)["against_reference"]
    assert (measured["rows_compared"], measured["reference_rows"]) == (40, 40) and measured["rows"] > 50

    # By hand: the slice's logits against the qtopk cache's rows 10..49 over their valid tokens.
    group, logits = zarr.open_group(str(whole), mode="r"), zarr.open_group(str(dense), mode="r")["logits"][:]
    p = _softmax(logits.astype(np.float64))
    deltas, codes = group["qtopk_class_deltas"][10:50].astype(np.int64), group["qtopk_codes"][10:50].astype(np.float64)
    scale, tail = group["qtopk_scale"][10:50].astype(np.float64), group["qtopk_tail"][10:50].astype(np.float64)
    weights_k = np.exp(-codes * scale[..., None])
    kept = (1 - tail)[..., None] * weights_k / weights_k.sum(-1, keepdims=True)
    completed = np.broadcast_to((np.maximum(tail, 2.0**-24) / (512 - 8))[..., None], p.shape).copy()
    np.put_along_axis(completed, deltas.cumsum(-1), kept, -1)
    valid = np.arange(32)[None, :] < group["lengths"][10:50][:, None]
    kl = (p * (np.log(p) - np.log(completed))).sum(-1)[valid].mean()
    assert measured["positions"] == valid.sum() and measured["kl_nats"] == pytest.approx(kl, rel=1e-4)

    # The other way round: the slice against the whole split's dense cache, row for row the same teacher outputs.
    itself = invoke_json("inspect", dense, "--reference", dense_whole)["against_reference"]
    assert itself["rows_compared"] == 40 and itself["kl_nats"] == pytest.approx(0, abs=1e-6)

    other = invoke_json("cache-teacher", "--teacher", "mlp-64", "--dataset", DATASET, "--device", "cpu", "--out", tmp_path / "o.zarr")
    code, _, err = invoke("inspect", whole, "--reference", other["cache"])
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    for named in ("teacher: mlp-64", "dataset: synthetic", "classes: 4 in the reference, 512 in the cache", "positions per row (token)"):
        assert named in err, (named, err)


# Two teachers over 8,192 classes of the standard library's bytes: one ranks the same classes
# first at every token, the other random ones at every token (drawn from a generator seeded by the
# row's bytes: the same row gives the same logits).
_ID_TEACHERS = '''
import torch

class Fixed(torch.nn.Module):
    def __init__(self, diverse):
        super().__init__()
        self.diverse = diverse
        self.bias = torch.randn(8192, generator=torch.Generator().manual_seed(0))

    def forward(self, x):
        if not self.diverse:
            return self.bias.expand(*x.shape, 8192).clone()
        seeds = (x.long() * torch.arange(1, x.shape[1] + 1)).sum(1).tolist()
        return torch.stack([torch.randn(x.shape[1], 8192, generator=torch.Generator().manual_seed(s)) for s in seeds])

def same(num_classes, input_shape):
    return Fixed(diverse=False)

def diverse(num_classes, input_shape):
    return Fixed(diverse=True)
'''


@pytest.mark.parametrize("kind, compressed", [(("--format", "topk", "--top-k", 32), False),
                                              (("--format", "topk", "--top-k", 32, "--codec", "zstd"), True),
                                              (("--format", "qtopk", "--top-k", 32, "--value-bits", 4), True)],
                         ids=["topk", "topk-zstd", "qtopk"])
def test_inspect_reports_the_bits_stored_per_kept_class_id_which_depend_on_how_diverse_the_kept_sets_are(tmp_path, kind, compressed):
    """`bits_per_class_id`: the class array's bytes on disk x 8 over the kept ids (tokens x K) at
    8,192 classes. Compressed (qtopk's sorted deltas, always; topk's ranked ids with --codec zstd):
    near nothing where every token keeps the same 32 classes, more than 10 bits where the sets are
    random (qtopk: about log2(e C / K) = 11.4). Uncompressed (topk's default codec): the 16 bits of
    a uint16, whatever the teacher (and a little for the array's metadata)."""
    from tests.conftest import invoke_json

    (tmp_path / "teachers.py").write_text(_ID_TEACHERS)
    bits = {}
    for teacher in ("same", "diverse"):
        out = tmp_path / f"{teacher}.zarr"
        invoke_json("cache-teacher", "--teacher", f"{tmp_path / 'teachers.py'}:{teacher}", "--dataset", "stdlib-bytes:seq=32,train=4000,test=400",
                    *kind, "--device", "cpu", "--out", out)
        report = invoke_json("inspect", out, "--png", tmp_path / f"{teacher}.png")
        array = "topk_indices" if kind[1] == "topk" else "qtopk_class_deltas"
        assert report["bits_per_class_id"] == pytest.approx(report["bytes_per_array"][array] * 8 / (report["num_tokens"] * 32))
        bits[teacher] = report["bits_per_class_id"]
    if compressed:
        assert bits["same"] < 1 and bits["diverse"] > 10, bits
    else:
        assert bits["same"] == bits["diverse"] == pytest.approx(16, abs=0.2), bits
