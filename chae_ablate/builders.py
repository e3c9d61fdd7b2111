"""Which network a cell trains: CHAE (the default), any timm architecture, or the user's own function.

`model.builder` in a study names one; BUILDERS maps each kind to its implementation and the form
the validator accepts:

    chae              the paper's model, configured by its typed knobs (model.conv, model.transformer, ...)
    timm:NAME         timm.create_model(NAME, pretrained=False, num_classes=..., **model.kwargs), with
                      img_size=model.resolution where the architecture takes one
    module:function   the user's function, from module.py beside the study or an importable module,
                      called as function(num_classes=..., resolution=..., **model.kwargs)

A user builder's source file is hashed when the study is loaded (OtherModel.source_sha, part of the
cell hash), and the code run is compiled from exactly the bytes hashed: editing the model makes new
cells, never a silent reuse of old ones. Costs (parameters, FLOPs, training memory) are counted on
the meta device, so nothing is allocated whatever the model's size.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .config import CHAE, ModelConfig, OtherModel, did_you_mean, key_text, short
from .errors import ChaeError, ConfigError
from .model import build_model

FROM_DATA = ("num_classes", "resolution")  # arguments every builder gets from the study, never from kwargs
TIMM_OWN = {"pretrained": "chae-ablate creates timm models untrained (nothing is downloaded)",
            "img_size": "it is model.resolution", "num_classes": "it comes from the data",
            "device": "the run places the model", "dtype": "the run sets the precision"}


@dataclass(frozen=True)
class Builder:
    """How one kind of builder is written, checked and called."""

    form: str  # how model.builder names it
    bind: Callable[[Any, Path | None, str], Any]  # resolve and check the config, before any training
    build: Callable[[Any, int], nn.Module]  # the untrained network for num_classes


def kind_of(model: ModelConfig | OtherModel) -> str:
    """The BUILDERS key of a model config."""
    if isinstance(model, ModelConfig):
        return CHAE
    prefix, colon, _ = model.builder.partition(":")
    return "timm" if prefix == "timm" and colon else "function"


# --- timm ---------------------------------------------------------------------------------------

def _timm():
    try:
        import timm
    except ImportError:
        raise ConfigError("model.builder: timm is not installed; pip install 'chae-ablate[timm]'") from None
    return timm


_TIMM_SIGNATURES: dict[str, inspect.Signature] = {}


def timm_signature(name: str) -> inspect.Signature:
    """The constructor signature of a timm architecture's class (the entry point itself takes
    **kwargs), found by building it once on the meta device."""
    if name not in _TIMM_SIGNATURES:
        with torch.device("meta"):
            model = _timm().create_model(name, pretrained=False)
        _TIMM_SIGNATURES[name] = inspect.signature(type(model).__init__)
    return _TIMM_SIGNATURES[name]


def bind_timm(model: OtherModel, home: Path | None, where: str) -> OtherModel:
    name = model.builder.removeprefix("timm:")
    timm = _timm()
    if not timm.is_model(name):
        raise ConfigError(f"{where}model.builder: {short(name)} is not a timm architecture"
                          f"{did_you_mean(name, timm.list_models(), quiet=True)} (list them: timm.list_models())")
    for key in model.kwargs:
        if key in TIMM_OWN:
            raise ConfigError(f"{where}model.kwargs.{key_text(key)}: set by chae-ablate ({TIMM_OWN[key]}); remove it")
    if model.kwargs:
        check_kwargs(model, timm_signature(name), where)
    return model


def build_timm(model: OtherModel, num_classes: int) -> nn.Module:
    name = model.builder.removeprefix("timm:")
    size = {"img_size": model.resolution} if "img_size" in timm_signature(name).parameters else {}
    return _timm().create_model(name, pretrained=False, num_classes=num_classes, **size, **model.kwargs)


# --- the user's function --------------------------------------------------------------------------

_FUNCTIONS: dict[tuple[str, str], Callable[..., nn.Module]] = {}  # (source file, sha) -> the function


def bind_function(model: OtherModel, home: Path | None, where: str) -> OtherModel:
    """Find the builder's file (beside the study first, then an importable module), hash it, load
    the function from the hashed bytes, and check its signature against model.kwargs."""
    module, _, name = model.builder.partition(":")
    if not module or not name or not all(part.isidentifier() for part in (*module.split("."), name)):
        forms = ", ".join(b.form for b in BUILDERS.values())
        raise ConfigError(f"{where}model.builder: {short(model.builder)} is not one of {forms}")
    file, beside = _source_file(module, home, where)
    code, sha = read_source(file)
    function = _load(module, name, file, code, sha, where, beside)
    signature = inspect.signature(function)
    check_kwargs(model, signature, where, needs=FROM_DATA)
    kwargs = {**plain_defaults(signature), **model.kwargs}  # every knob explicit, as CHAE's config is
    return replace(model, kwargs=kwargs, source_sha=sha, source_file=str(file))


def read_source(file: Path) -> tuple[bytes, str]:
    """A builder file's bytes and their hash (the first 12 hex digits of SHA-256: OtherModel.source_sha)."""
    code = file.read_bytes()
    return code, hashlib.sha256(code).hexdigest()[:12]


def plain_defaults(signature: inspect.Signature) -> dict:
    """The builder's keyword defaults that are plain data (numbers, text, lists of them): written
    into the config, so that a variant or trial naming a default is the baseline's cell, not a
    new one, and MLflow shows every knob's value. Others (a class, a function) stay implicit: the
    file's hash covers them."""
    def plain(value) -> bool:
        if isinstance(value, (list, tuple)):
            return all(plain(v) for v in value)
        return value is None or isinstance(value, (bool, int, float, str))

    return {n: list(p.default) if isinstance(p.default, tuple) else p.default for n, p in signature.parameters.items()
            if n not in FROM_DATA and p.default is not p.empty and plain(p.default)}


def _source_file(module: str, home: Path | None, where: str) -> tuple[Path, bool]:
    """The builder's file, and whether it was found beside the study (else: an importable module)."""
    beside = home / Path(*module.split(".")).with_suffix(".py") if home else None
    if beside is not None and beside.is_file():
        return beside.resolve(), True
    found = _importable(module)
    if found is None:
        looked = f"{beside} (beside the study) nor " if beside else ""
        raise ConfigError(f"{where}model.builder: found neither {looked}an importable Python module "
                          f"{short(module)}; put {module.split('.')[-1]}.py beside the study file")
    return found, False


def _load(module: str, name: str, file: Path, code: bytes, sha: str, where: str,
          beside: bool) -> Callable[..., nn.Module]:
    """The function `name` of `file` as compiled from `code`, the very bytes hashed, once per process
    and version of the file: an edit is never trained under the old hash, nor the old code under a
    new one (as an import's cache or a notebook's earlier import could)."""
    if (str(file), sha) not in _FUNCTIONS:
        try:
            namespace = _run_file(module, file, code, sha, beside)
        except Exception as e:
            raise ConfigError(f"{where}model.builder: importing {file} failed: {type(e).__name__}: "
                              f"{short(str(e), 200)}") from e
        function = getattr(namespace, name, None)
        if not callable(function):
            names = [n for n, v in vars(namespace).items() if callable(v) and not n.startswith("_")]
            raise ConfigError(f"{where}model.builder: {file.name} has no function {name!r}"
                              f"{did_you_mean(name, names)}")
        _FUNCTIONS[(str(file), sha)] = function
    return _FUNCTIONS[(str(file), sha)]


def _importable(module: str) -> Path | None:
    """The source file Python's own import of `module` would run, if any."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    return Path(spec.origin).resolve() if spec and spec.origin and spec.origin.endswith(".py") else None


def _run_file(module: str, file: Path, code: bytes, sha: str, beside: bool) -> types.ModuleType:
    """A module made from `code`, registered under a name of its own (dataclasses and pickle look
    modules up by name) so that it never replaces a module already imported; relative imports
    resolve in its real package, and a file beside the study can import its neighbours."""
    namespace = types.ModuleType(f"chae_builder_{sha}_{module.replace('.', '_')}")
    namespace.__file__, namespace.__package__ = str(file), module.rpartition(".")[0]
    sys.modules[namespace.__name__] = namespace
    home = str(file.parents[module.count(".")])  # the study's folder, for a file found beside it
    if beside:
        sys.path.insert(0, home)
    try:
        exec(compile(code, str(file), "exec"), namespace.__dict__)
    finally:
        if beside:
            sys.path.remove(home)
    return namespace


def build_function(model: OtherModel, num_classes: int) -> nn.Module:
    function = _FUNCTIONS.get((model.source_file, model.source_sha))
    if function is None:  # a process that did not load the study itself (a spawned worker): load it here
        file = Path(model.source_file)
        code, sha = read_source(file)
        if sha != model.source_sha:
            raise ChaeError(f"{file} changed since the study was loaded (source {model.source_sha} -> {sha}): "
                            "its cells would not match their hash; run the command again")
        module, _, name = model.builder.partition(":")
        function = _load(module, name, file, code, sha, "", beside=_importable(module) != file)
    network = function(num_classes=num_classes, resolution=model.resolution, **model.kwargs)
    if not isinstance(network, nn.Module):
        raise ChaeError(f"builder {model.builder} returned {type(network).__name__}, not a torch.nn.Module")
    return network


def check_kwargs(model: OtherModel, signature: inspect.Signature, where: str, needs: tuple[str, ...] = ()) -> None:
    """Every model.kwargs name is an argument the builder accepts (by its signature), and the
    arguments chae-ablate passes (`needs`) are ones it takes."""
    params = signature.parameters
    open_ended = any(p.kind is p.VAR_KEYWORD for p in params.values())
    accepted = [n for n, p in params.items() if n not in ("self", *FROM_DATA, *TIMM_OWN)
                and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    missing = [n for n in needs if n not in params and not open_ended]
    if missing:
        raise ConfigError(f"{where}model.builder: {model.builder} must take {' and '.join(needs)} as keyword "
                          f"arguments (it takes: {', '.join(accepted) or 'nothing'})")
    for key in model.kwargs:
        if key in FROM_DATA:
            raise ConfigError(f"{where}model.kwargs.{key}: set by chae-ablate "
                              f"({'it comes from the data' if key == 'num_classes' else 'use model.resolution'}); "
                              "remove it")
        if key not in accepted and not open_ended:
            raise ConfigError(f"{where}model.kwargs.{key_text(key)}: not an argument of {model.builder}"
                              f"{did_you_mean(str(key), accepted, quiet=True)} (accepted: {', '.join(accepted) or 'none'})")


# --- the registry ------------------------------------------------------------------------------

BUILDERS = {
    CHAE: Builder(CHAE, lambda model, home, where: model, build_model),  # its dataclasses check it already
    "timm": Builder("timm:NAME", bind_timm, build_timm),
    "function": Builder("module:function", bind_function, build_function),
}


def bind(model: ModelConfig | OtherModel, home: Path | None, where: str = "") -> ModelConfig | OtherModel:
    """The model config resolved and checked against its builder; `home` is the study's folder,
    where user builders are looked for first."""
    return BUILDERS[kind_of(model)].bind(model, home, f"{where}." if where else "")


def build(model: ModelConfig | OtherModel, num_classes: int) -> nn.Module:
    """The untrained network a model config describes."""
    return BUILDERS[kind_of(model)].build(model, num_classes)


# --- costs, on the meta device ----------------------------------------------------------------------

STATE_PER_PARAM = {"adam": 2, "adamw": 2, "sgd": 1}  # optimizer tensors kept per parameter tensor
_COST_DEVICE: dict[tuple, str] = {}


@contextmanager
def failing_as(model: ModelConfig | OtherModel, variant: str) -> Iterator[None]:
    """A builder's own exception (or its network's, on a first forward pass) as one line naming the variant."""
    try:
        yield
    except ChaeError:
        raise
    except Exception as e:
        text = str(e).strip().splitlines()[0] if str(e).strip() else ""  # its first line, cut short
        raise ChaeError(f"variant {variant}: builder {getattr(model, 'builder', CHAE)} failed at resolution "
                        f"{model.resolution}: {type(e).__name__}: {text[:200]}") from e


def cost_device(model: ModelConfig | OtherModel, num_classes: int) -> str:
    """Where a network's costs are counted: the meta device (nothing allocated) where its builder and
    forward pass run there, as CHAE's and timm's do; else the CPU, for a builder that needs real
    tensors while it builds (e.g. calls .item()). Either gives the same counts. A network that fails
    on the CPU too raises its own error."""
    key = (model, num_classes)
    if isinstance(model, ModelConfig):
        return "meta"
    if key not in _COST_DEVICE:
        for device in ("meta", "cpu"):
            try:
                with torch.device(device), torch.no_grad():
                    build(model, num_classes).eval()(torch.zeros(1, 3, model.resolution, model.resolution))
                _COST_DEVICE[key] = device
                break
            except Exception:
                if device == "cpu":
                    raise
    return _COST_DEVICE[key]


def check_builds(model: ModelConfig | OtherModel, num_classes: int, variant: str) -> None:
    """Before any training: the network builds and takes an image of its resolution (one line naming
    the variant when not)."""
    with failing_as(model, variant):
        cost_device(model, num_classes)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def parameter_count(model: ModelConfig | OtherModel, num_classes: int) -> int:
    """Trainable parameters of the network a config builds, without allocating it (meta device)."""
    with torch.device(cost_device(model, num_classes)):
        return count_parameters(build(model, num_classes))


def forward_flops(model: ModelConfig | OtherModel, num_classes: int) -> int:
    """Forward FLOPs for one image (a multiply-add counts as 2), from torch's flop counter.

    Counted on the meta device: no memory is allocated whatever the size, and attention runs as
    the math path's two batched matmuls, which the counter sees (the CPU's fused attention kernel
    is not counted by torch's FlopCounterMode, so a CPU count misses attention entirely)."""
    with torch.device(cost_device(model, num_classes)):
        network = build(model, num_classes).eval()
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            network(torch.zeros(1, 3, model.resolution, model.resolution))
    return int(counter.get_total_flops())


def training_memory(model: ModelConfig | OtherModel, num_classes: int, batch_size: int, optimizer: str) -> int:
    """Bytes one training step holds, estimated in float32 on the meta device: weights, gradients,
    optimizer state, and the activations autograd keeps for the backward pass at this batch size
    (a tensor saved twice counted once; the allocator's slack and cuDNN workspaces not counted)."""
    saved: dict[int, torch.Tensor] = {}

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        saved.setdefault(id(tensor), tensor)
        return tensor

    with torch.device(cost_device(model, num_classes)):
        network = build(model, num_classes).train()
        images = torch.zeros(batch_size, 3, model.resolution, model.resolution)
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
            network(images)
    weights = {id(p): p.numel() * p.element_size() for p in network.parameters() if p.requires_grad}
    activations = sum(t.numel() * t.element_size() for i, t in saved.items() if i not in weights)
    return sum(weights.values()) * (2 + STATE_PER_PARAM[optimizer]) + activations
