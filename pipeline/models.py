"""Built-in architectures and resolving a model spec into an `nn.Module`.

A model spec is one of:
  a built-in name            see BUILTIN_MODELS
  mlp:width=W,depth=D        and bytelm:dim=D,layers=N,heads=H, lstm:vocab=V,dim=D,hidden=H,...
  gpt2:layers=N,dim=D,heads=H,vocab=V,positions=P   a fresh GPT-2-style causal LM (pipeline.hf; the
                             `hf` extra) of P positions (0, the default: as many as the rows are long)
  hf:path/to/folder          a local Hugging Face transformers checkpoint: a causal LM (next-token
                             logits per position) or else a sequence classifier over token ids
                             (pipeline.hf; needs the `hf` extra)
  torchscript:path/model.pt  a TorchScript file (torch.jit.save)
  export:path/model.pt2      a torch.export program file (torch.export.save)
  package.module:factory     or path/to/file.py:factory, called with `num_classes` (and
                             `input_shape`, the shape of one input without the batch axis, when
                             its signature accepts it), returning an `nn.Module`
Every model outputs (batch, num_classes) logits, or (batch, tokens, num_classes) for a model of
sequences that predicts every token (a language model). A model that can also give features
for feature targets has `logits_and_features(inputs) -> (logits, features (batch, F))`.
"""

from __future__ import annotations

import inspect
import math
import os
import warnings
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.specs import MODEL_FORMS, BuiltinSpec, either, FactorySpec, FileSpec, load_factory, parse_spec, whole_number_parameters
from stages.data import MAX_CLASSES
from stages.errors import InputError
from stages.weights import load_weights


def build_cnn(num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    """A two-conv CNN teacher for small images (C, H, W): conv32-pool-conv64-pool-fc128."""
    if len(input_shape) != 3:
        raise InputError(f"model 'cnn' needs image inputs (channels, height, width), got shape {tuple(input_shape)}")
    channels, height, width = input_shape
    return nn.Sequential(
        nn.Conv2d(channels, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * (height // 4) * (width // 4), 128), nn.ReLU(), nn.Dropout(0.25),
        nn.Linear(128, num_classes),
    )


def build_mlp(num_classes: int, input_shape: tuple[int, ...], width: int, depth: int = 2) -> nn.Module:
    """A fully connected student: `depth` hidden ReLU layers of `width` units over flattened inputs."""
    layers: list[nn.Module] = [nn.Flatten()]
    features = math.prod(input_shape)
    for _ in range(depth):
        layers += [nn.Linear(features, width), nn.ReLU()]
        features = width
    layers.append(nn.Linear(features, num_classes))
    return nn.Sequential(*layers)


class CausalSelfAttentionBlock(nn.Module):
    """A pre-norm transformer block: causal multi-head self-attention, then a 4x GELU MLP."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.attention_norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.projection = nn.Linear(dim, dim)
        self.mlp_norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        q, k, v = self.qkv(self.attention_norm(x)).view(batch, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.projection(attended.transpose(1, 2).reshape(batch, length, dim))
        return x + self.mlp(self.mlp_norm(x))


class ByteTransformer(nn.Module):
    """A decoder-only transformer language model: token ids (B, L) -> next-token logits (B, L, C).

    Learned token and position embeddings, `layers` causal blocks, a final norm and a linear
    head. Causal attention means padding after a sequence's end cannot change its predictions,
    so padded batches need no attention mask."""

    def __init__(self, num_classes: int, input_shape: tuple[int, ...], dim: int, layers: int, heads: int):
        super().__init__()
        if len(input_shape) != 1:
            raise InputError(f"a bytelm model needs token sequences (length,), got input shape {tuple(input_shape)}")
        if dim % heads:
            raise InputError(f"bytelm: dim ({dim}) must be a multiple of heads ({heads})")
        self.token_embedding = nn.Embedding(num_classes, dim)
        self.position_embedding = nn.Embedding(input_shape[0], dim)
        self.blocks = nn.ModuleList(CausalSelfAttentionBlock(dim, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.is_floating_point():
            raise InputError("a bytelm model needs integer token ids as inputs")
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.token_embedding(tokens) + self.position_embedding(positions)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


class LSTMClassifier(nn.Module):
    """A small text classifier: token embeddings, a bidirectional LSTM, and mean- and max-pooling
    over the tokens that are not padding, then a linear head: (B, L) token ids -> (B, C).

    The student of the classic BERT -> BiLSTM distillation (Tang et al. 2019). Its features,
    for feature targets, are the pooled vector (B, 4 * hidden)."""

    def __init__(self, num_classes: int, input_shape: tuple[int, ...], vocab: int, dim: int, hidden: int, layers: int,
                 pad: int):
        super().__init__()
        if len(input_shape) != 1:
            raise InputError(f"an lstm model needs token sequences (length,), got input shape {tuple(input_shape)}")
        self.pad = pad
        self.embedding = nn.Embedding(vocab, dim, padding_idx=pad)
        self.lstm = nn.LSTM(dim, hidden, num_layers=layers, batch_first=True, bidirectional=True)
        self.head = nn.Linear(4 * hidden, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.logits_and_features(tokens)[0]

    def logits_and_features(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if tokens.is_floating_point():
            raise InputError("an lstm model needs integer token ids as inputs")
        # Checked on the CPU only: on a GPU it would cost a device sync every step (and an
        # out-of-range id fails there as a device-side assert).
        if tokens.device.type == "cpu" and int(tokens.max()) >= self.embedding.num_embeddings:
            raise InputError(f"token id {int(tokens.max())} is outside the lstm's vocabulary of {self.embedding.num_embeddings}")
        states, _ = self.lstm(self.embedding(tokens))
        valid = (tokens != self.pad).unsqueeze(-1)
        mean = (states * valid).sum(1) / valid.sum(1).clamp(min=1)
        peak = states.masked_fill(~valid, float("-inf")).amax(1).nan_to_num(neginf=0.0)  # an all-padding row pools to 0
        features = torch.cat([mean, peak], dim=-1)
        return self.head(features), features


BUILTIN_MODELS = {
    "cnn": build_cnn,
    "mlp-64": partial(build_mlp, width=64),
    "mlp-128": partial(build_mlp, width=128),
    "mlp-400": partial(build_mlp, width=400),
    "mlp-800": partial(build_mlp, width=800),
    "linear": partial(build_mlp, width=0, depth=0),
    # Byte-level language models for the stdlib-bytes dataset: a teacher that trains in a few
    # minutes on 2 CPU cores (1.9M parameters) and a student 13x smaller.
    "bytelm-teacher": partial(ByteTransformer, dim=192, layers=4, heads=4),
    "bytelm-student": partial(ByteTransformer, dim=64, layers=2, heads=2),
}
# Parametric built-ins, `name:key=value,...`: their builder and default parameters.
PARAMETRIC_MODELS = {
    "mlp": (build_mlp, {"width": 256, "depth": 2}),
    "bytelm": (ByteTransformer, {"dim": 128, "layers": 2, "heads": 4}),
    # vocab: the tokenizer's vocabulary size (30522 for BERT's); pad: its padding id
    "lstm": (LSTMClassifier, {"vocab": 30522, "dim": 64, "hidden": 64, "layers": 1, "pad": 0}),
    # A fresh GPT-2 (transformers' GPT2Config, nothing downloaded); vocab 0: the data's class count;
    # positions 0: the rows' length (see pipeline.hf.build_gpt2 for why that stays the default).
    "gpt2": (lambda *args, **params: _hf().build_gpt2(*args, **params),
             {"layers": 4, "dim": 256, "heads": 4, "vocab": 0, "positions": 0}),
}
# The parameters that may be 0: a padding id, and "the data's" vocabulary and row length; every other is at least 1.
MAY_BE_ZERO = {"lstm": ("pad",), "gpt2": ("vocab", "positions")}
# The largest value of each parameter: vocabularies and ids within the classes any label may
# imply, sizes past any model this builds from a spec (which would otherwise be allocated first).
PARAMETER_MAXIMUM = {"vocab": MAX_CLASSES, "pad": MAX_CLASSES, "positions": 2**20, "width": 2**16, "dim": 2**16,
                     "hidden": 2**16, "depth": 1024, "layers": 1024, "heads": 1024}


def _hf():
    """pipeline.hf, imported when a model needs transformers (an optional dependency)."""
    import pipeline.hf

    return pipeline.hf


def _parametric(name: str, args: str, num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    """`mlp:width=W,depth=D` or `bytelm:dim=D,layers=N,heads=H`: any size (for sweeps and benchmarks)."""
    build, defaults = PARAMETRIC_MODELS[name]
    params = whole_number_parameters("model", name, args, defaults, PARAMETER_MAXIMUM)
    zero = MAY_BE_ZERO.get(name, ())
    if any(value < (0 if key in zero else 1) for key, value in params.items()):
        bounds = f"{', '.join(k for k in defaults if k not in zero)} must be at least 1"
        raise InputError(f"model spec {name}:{args}: {bounds}{''.join(f' and {k} at least 0' for k in zero)}")
    # Sizes each within bounds may still make a model larger than the machine (mlp:width=65536,
    # depth=1024 is 4.4e12 parameters): counted first on the meta device, which allocates nothing.
    with torch.device("meta"):
        parameters = sum(p.numel() for p in build(num_classes, input_shape, **params).parameters())
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if 4 * parameters > memory:
        raise InputError(f"model spec {name}:{args}: {parameters:,} parameters take {4 * parameters / 2**30:,.1f} GiB "
                         f"as float32, more than this machine's {memory / 2**30:,.1f} GiB of memory")
    return build(num_classes, input_shape, **params)


def resolve_model(spec: str, *, num_classes: int, input_shape: tuple[int, ...], weights: Path | None = None) -> nn.Module:
    """Build the model named by `spec` for `num_classes` classes, loading `weights` if given."""
    parsed = parse_spec(spec, PARAMETRIC_MODELS)
    if spec in BUILTIN_MODELS:
        model = BUILTIN_MODELS[spec](num_classes, tuple(input_shape))
    elif isinstance(parsed, FileSpec) and parsed.kind == "hf":
        model = _hf().build_from_folder(parsed.path, num_classes)
    elif isinstance(parsed, FileSpec) and parsed.kind in SAVED_PROGRAMS:
        model = _saved_program(parsed.kind, Path(parsed.path))
    elif isinstance(parsed, BuiltinSpec) and parsed.name in PARAMETRIC_MODELS:
        model = _parametric(parsed.name, parsed.args or "", num_classes, tuple(input_shape))
    elif isinstance(parsed, FactorySpec):
        factory = load_factory(parsed, "model")
        kwargs = {"num_classes": num_classes}
        if "input_shape" in _parameters(factory):
            kwargs["input_shape"] = tuple(input_shape)
        try:
            model = factory(**kwargs)
        except Exception as exc:
            raise InputError(f"model factory {spec!r} failed: {type(exc).__name__}: {exc}") from exc
        if not isinstance(model, nn.Module):
            raise InputError(f"model factory {spec!r} returned {type(model).__name__}, not a torch.nn.Module")
    else:
        parametric = (f"{name}:{','.join(f'{k}={k[0].upper()}' for k in defaults)}" for name, (_, defaults) in PARAMETRIC_MODELS.items())
        raise InputError(f"unknown model spec {spec!r}; use a built-in ({', '.join((*BUILTIN_MODELS, *parametric))}), "
                         f"{either(MODEL_FORMS)}")
    if weights is not None:
        load_weights(model, weights)
    return model


def _saved_program(kind: str, path: Path) -> nn.Module:
    """A TorchScript or torch.export file: a program saved by another team. Like a factory
    file, it is code the user names: its graph runs when the model is called, and torch may
    unpickle parts of an export archive. Load only files you trust."""
    if not path.is_file():
        raise InputError(f"{kind} model file not found: {path}")
    try:
        with warnings.catch_warnings():
            # torch deprecates TorchScript in favour of torch.export; loading one still works.
            warnings.simplefilter("ignore", DeprecationWarning)
            loaded = torch.jit.load(str(path), map_location="cpu") if kind == "torchscript" else torch.export.load(str(path))
    except Exception as exc:
        raise InputError(f"cannot load {kind} model {path}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
    return loaded if kind == "torchscript" else ExportedProgramModel(loaded.module())


class ExportedProgramModel(nn.Module):
    """A torch.export program as a module. Its graph was fixed at export (dropout and batch norm
    act as they did then), and its module refuses train()/eval(): here they only set the flag."""

    def __init__(self, program: nn.Module):
        super().__init__()
        self.program = program

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.program(inputs)

    def train(self, mode: bool = True) -> ExportedProgramModel:
        self.training = mode
        return self


SAVED_PROGRAMS = ("torchscript", "export")


def _parameters(factory) -> set[str]:
    try:
        return set(inspect.signature(factory).parameters)
    except (TypeError, ValueError):
        return set()
