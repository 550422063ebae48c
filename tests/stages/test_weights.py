"""Saving, loading and identifying weights (stages.weights): safetensors or a plain state dict
read with weights_only=True, nothing ever unpickled, and every file that is not weights for this
model refused with one clear InputError."""

from __future__ import annotations

import os
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pipeline.models import resolve_model
from stages.errors import InputError, PipelineError
from stages.weights import count_parameters, load_weights, save_weights, weights_fingerprint


def _model(seed: int = 0, width: int = 16) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, width), nn.BatchNorm1d(width), nn.ReLU(), nn.Linear(width, 3))


def _trained_a_little(model: nn.Module) -> nn.Module:
    """Changes the batch-norm buffers too, so that a round trip must carry them."""
    model.train()
    model(torch.randn(32, 6) * 3 + 1)
    return model.eval()


def _same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --- saving ----------------------------------------------------------------------------------

def test_a_safetensors_file_holds_every_tensor_of_the_state_dict(tmp_path):
    model = _trained_a_little(_model())
    save_weights(model, tmp_path / "w.safetensors")
    stored = load_file(str(tmp_path / "w.safetensors"))  # a real safetensors file, read by the safetensors library
    assert stored.keys() == model.state_dict().keys() and "1.running_mean" in stored
    assert all(torch.equal(stored[k], v) for k, v in model.state_dict().items())


def test_another_suffix_is_a_plain_state_dict_that_weights_only_reads(tmp_path):
    model = _trained_a_little(_model())
    save_weights(model, tmp_path / "w.pt")
    stored = torch.load(tmp_path / "w.pt", weights_only=True)
    assert stored.keys() == model.state_dict().keys()
    assert all(torch.equal(stored[k], v) for k, v in model.state_dict().items())


def test_saving_a_view_or_a_shared_tensor_stores_it_whole_and_contiguous(tmp_path):
    """safetensors refuses non-contiguous or shared storage: the saver hands it plain copies."""
    model = nn.Linear(4, 4)
    with torch.no_grad():
        model.weight.set_(torch.arange(16.0).reshape(4, 4).t())  # a transposed view
    assert not model.weight.is_contiguous()
    save_weights(model, tmp_path / "w.safetensors")
    assert torch.equal(load_file(str(tmp_path / "w.safetensors"))["weight"], torch.arange(16.0).reshape(4, 4).t())


def test_saving_makes_the_folder_and_replaces_an_older_file_whole(tmp_path):
    path = tmp_path / "deep" / "er" / "w.safetensors"
    save_weights(_model(1), path)
    save_weights(_model(2), path)
    loaded = _model(3)
    load_weights(loaded, path)
    assert _same_state(loaded, _model(2))
    assert os.listdir(path.parent) == ["w.safetensors"]  # no temporary file left beside it


def test_an_unwritable_destination_is_a_pipeline_error_naming_it(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(PipelineError, match="cannot write weights .*file/w.safetensors") as error:
        save_weights(_model(), tmp_path / "file" / "w.safetensors")
    assert type(error.value) is PipelineError  # a runtime failure (exit 1), not bad input


# --- loading ---------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".bin"])
def test_a_round_trip_restores_weights_and_buffers_exactly(tmp_path, suffix):
    source = _trained_a_little(_model(0))
    save_weights(source, tmp_path / f"w{suffix}")
    target = _model(1)
    assert not _same_state(source, target)
    load_weights(target, tmp_path / f"w{suffix}")
    assert _same_state(source, target)
    x = torch.randn(5, 6)
    assert torch.equal(target.eval()(x), source(x))


def test_a_missing_file_or_a_folder_is_refused(tmp_path):
    with pytest.raises(InputError, match="weights file not found: .*none.safetensors"):
        load_weights(_model(), tmp_path / "none.safetensors")
    with pytest.raises(InputError, match="weights file not found"):
        load_weights(_model(), tmp_path)


class Booby:
    """Unpickling this runs code: it writes the marker file named in it."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_state_dict_with_a_pickle_that_would_run_code_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "code-ran"
    state = {**_model().state_dict(), "extra": Booby(marker)}
    torch.save(state, tmp_path / "evil.pt")
    with pytest.raises(InputError, match="holds objects other than tensors; refusing to unpickle them"):
        load_weights(_model(), tmp_path / "evil.pt")
    assert not marker.exists()


def test_a_bare_pickle_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "code-ran"
    (tmp_path / "w.pkl").write_bytes(pickle.dumps({"weight": Booby(marker)}, protocol=2))
    with pytest.raises(InputError, match="cannot read weights file .*refusing to unpickle them"):
        load_weights(_model(), tmp_path / "w.pkl")
    assert not marker.exists()


@pytest.mark.parametrize("name, content", [
    ("w.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all"),
    ("w.safetensors", b""),
    ("w.pt", b"PK\x03\x04 a torn zip"),
    ("w.pt", b"hello, world"),
], ids=["safetensors-header-not-json", "empty-safetensors", "torn-zip", "text"])
def test_a_file_that_is_not_weights_is_refused_with_its_format_named(tmp_path, name, content):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(InputError, match=f"cannot read weights file .*{name}: not safetensors or a PyTorch state dict"):
        load_weights(_model(), tmp_path / name)


def test_a_truncated_safetensors_file_is_refused(tmp_path):
    save_weights(_model(), tmp_path / "w.safetensors")
    data = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "w.safetensors").write_bytes(data[: len(data) - 40])
    with pytest.raises(InputError, match="not safetensors or a PyTorch state dict"):
        load_weights(_model(), tmp_path / "w.safetensors")


@pytest.mark.parametrize("content", [[torch.zeros(2)], {"weight": 3, "bias": torch.zeros(3)}, torch.zeros(3)])
def test_a_readable_file_that_is_not_a_state_dict_of_tensors_is_refused(tmp_path, content):
    torch.save(content, tmp_path / "w.pt")
    with pytest.raises(InputError, match="does not hold a state dict of tensors"):
        load_weights(nn.Linear(2, 3), tmp_path / "w.pt")


def test_weights_that_do_not_fit_name_what_is_missing_unexpected_and_misshapen(tmp_path):
    state = {k: v for k, v in _model(width=16).state_dict().items() if k != "3.bias"}
    state["0.weight"] = torch.zeros(8, 6)
    state["4.weight"] = torch.zeros(1)
    save_file(state, str(tmp_path / "w.safetensors"))
    target = _model(5)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(InputError) as error:
        load_weights(target, tmp_path / "w.safetensors")
    message = str(error.value)
    assert "does not fit the model: 1 tensor(s) missing (e.g. 3.bias); 1 unexpected (e.g. 4.weight); " \
           "1 of another shape (e.g. 0.weight is (8, 6) in the file, (16, 6) in the model)" in message, message
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())  # nothing half loaded


def test_resolving_a_model_with_weights_loads_them(tmp_path):
    source = resolve_model("mlp-64", num_classes=3, input_shape=(4,))
    save_weights(source, tmp_path / "w.safetensors")
    assert _same_state(resolve_model("mlp-64", num_classes=3, input_shape=(4,), weights=tmp_path / "w.safetensors"), source)


# --- identifying -----------------------------------------------------------------------------

def test_parameters_are_counted_without_buffers():
    model = _model(width=16)
    assert count_parameters(model) == (6 * 16 + 16) + (16 + 16) + (16 * 3 + 3)  # the norm's running stats are buffers


def test_the_fingerprint_survives_a_round_trip_and_sees_any_change(tmp_path):
    source = _trained_a_little(_model(0))
    save_weights(source, tmp_path / "w.safetensors")
    copy = _model(1)
    assert weights_fingerprint(copy) != weights_fingerprint(source)
    load_weights(copy, tmp_path / "w.safetensors")
    assert weights_fingerprint(copy) == weights_fingerprint(source)
    with torch.no_grad():
        copy[3].bias[2] += 1e-6  # one value
    assert weights_fingerprint(copy) != weights_fingerprint(source)
    copy = _model(1)
    load_weights(copy, tmp_path / "w.safetensors")
    copy[1].running_var[0] += 1  # a buffer
    assert weights_fingerprint(copy) != weights_fingerprint(source)


def test_the_fingerprint_tells_apart_names_shapes_and_dtypes_of_the_same_bytes():
    values = torch.arange(6.0)
    flat, square = nn.Module(), nn.Module()
    flat.register_buffer("a", values.clone())
    square.register_buffer("a", values.reshape(2, 3).clone())
    renamed = nn.Module()
    renamed.register_buffer("b", values.clone())
    as_int = nn.Module()
    as_int.register_buffer("a", values.view(torch.int32).clone())  # the same bytes read as int32
    prints = {weights_fingerprint(m) for m in (flat, square, renamed, as_int)}
    assert len(prints) == 4
    assert len(weights_fingerprint(flat)) == 64 and int(weights_fingerprint(flat), 16) >= 0  # SHA-256 in hex


def test_the_fingerprint_does_not_depend_on_the_order_tensors_were_registered():
    first, second = nn.Module(), nn.Module()
    first.register_buffer("a", torch.ones(2))
    first.register_buffer("b", torch.zeros(3))
    second.register_buffer("b", torch.zeros(3))
    second.register_buffer("a", torch.ones(2))
    assert list(first.state_dict()) != list(second.state_dict())
    assert weights_fingerprint(first) == weights_fingerprint(second)
