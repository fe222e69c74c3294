"""Model sources: where a model comes from, for the CLI and the checkpoint manifest alike.

Five forms, one string each (``list_source_forms()``; ``parc-convert --list-sources``):

- ``mobilevit_s`` (or ``timm:mobilevit_s``): a timm model name; arguments go to ``timm.create_model``.
- ``torchvision:vit_b_16``: a torchvision builder (``torchvision.models.get_model``); arguments are its keyword
  arguments. No weights are downloaded unless asked for (``weights=DEFAULT`` or ``--pretrained``).
- ``transformers:PATH``: a local directory with a ``config.json`` (and ``model.safetensors`` weights if present),
  built offline as the class its ``architectures`` names (what the matching Auto class picks; ``AutoModel``'s
  class when none is named); arguments override config fields.
- ``transformers:ViTForImageClassification``: a ``transformers`` model class built from a config whose fields
  are the arguments.
- ``package.module:function``: the user's own builder, imported from the current directory or the environment
  and called with the arguments.

The first four are *rebuildable*: a checkpoint records them (name and arguments, or the ``config.json``
contents) and :func:`create_model` rebuilds them from the manifest without importing anything but timm,
torchvision or transformers. A builder is imported only by :func:`create_model` on a :class:`ModelSource`
the caller made from a string it chose (the command line, ``model=`` in Python): :func:`source_from_manifest`
turns a builder recorded in a file into a source that refuses to build, so a file never runs code.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import json
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from .errors import ConfigError, ParcSurgeryError
from .transformers_source import build_transformers, get_transformers_class, read_transformers_dir

__all__ = [
    "SOURCE_ATTR",
    "ModelSource",
    "SourceKind",
    "create_model",
    "get_source",
    "list_source_forms",
    "source_from_manifest",
    "source_of_model",
]

SourceKind = Literal["timm", "torchvision", "transformers", "builder", "module"]
SOURCE_ATTR = "_parc_surgery_source"  # set on models made by create_model: the source they came from
REBUILDABLE = ("timm", "torchvision", "transformers")

# timm arguments that would load files or weights: never passed through a source, never recorded
TIMM_FORBIDDEN_ARGS = ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path", "cache_dir")
# torchvision arguments that load weights: honoured when given on purpose, never recorded (the file has the weights)
TORCHVISION_WEIGHT_ARGS = ("weights", "weights_backbone")

_IDENT = r"[A-Za-z_]\w*"
_BUILDER_RE = re.compile(rf"^{_IDENT}(\.{_IDENT})*:{_IDENT}(\.{_IDENT})*$")


def list_source_forms() -> list[tuple[str, str, str]]:
    """The model source forms as ``(form, example, what it builds)`` rows."""
    return [
        ("NAME", "mobilevit_s", "timm.create_model(NAME, **args) (also timm:NAME)"),
        ("torchvision:NAME", "torchvision:resnet18", "torchvision.models.get_model(NAME, **args); no weights"),
        ("transformers:PATH", "transformers:./my_vit", "a local directory with config.json (+ safetensors weights)"),
        ("transformers:CLASS", "transformers:ViTForImageClassification", "CLASS(CLASS.config_class(**args))"),
        ("package.module:function", "mynets.models:small_net", "your builder, imported from . or the environment"),
        ("PATH.safetensors", "parcnet_s.safetensors", "a file written by --output (CLI only)"),
    ]


def forms_text() -> str:
    """The forms on one line, for error messages."""
    return "valid forms: " + "; ".join(f"{form} (e.g. {ex})" for form, ex, _ in list_source_forms())


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: ``kind``, ``name`` and keyword ``args`` (config fields for transformers).

    ``config`` is the ``config.json`` contents of a transformers model (``None`` for a class built from ``args``);
    ``path`` the directory it was read from (its weights are loaded when building from the command line; never
    recorded). ``kind="module"`` describes a model of unknown origin (``name`` is its class): it cannot be built.
    ``trusted`` says the caller chose this source (a builder is imported only then, never for a file's manifest).
    """

    kind: SourceKind
    name: str
    args: Mapping[str, Any] = field(default_factory=dict)
    config: Mapping[str, Any] | None = None
    path: str | None = None
    trusted: bool = True

    def __post_init__(self) -> None:
        if self.kind not in (*REBUILDABLE, "builder", "module"):
            raise ConfigError(f"ModelSource: unknown kind {self.kind!r}; {forms_text()}")
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"ModelSource: name must be a non-empty string, got {self.name!r}")
        if not isinstance(self.args, Mapping) or not all(isinstance(k, str) for k in self.args):
            raise ConfigError(f"ModelSource: args must be a dict with string keys, got {self.args!r}")
        if self.config is not None and not isinstance(self.config, Mapping):
            raise ConfigError(f"ModelSource: config must be a dict (config.json contents), got {self.config!r}")

    @property
    def spec(self) -> str:
        """The source as one string (``torchvision:resnet18``, ``transformers:./dir``)."""
        if self.kind in ("timm", "builder", "module"):
            return self.name
        return f"{self.kind}:{self.path or self.name}"

    @property
    def rebuildable(self) -> bool:
        """A checkpoint can rebuild it from its manifest alone (no user code)."""
        return self.kind in REBUILDABLE

    def to_manifest(self) -> dict[str, Any]:
        """The JSON a checkpoint records (weight-loading arguments left out: the file holds the weights)."""
        args = {k: v for k, v in self.args.items() if k not in TORCHVISION_WEIGHT_ARGS or self.kind != "torchvision"}
        out: dict[str, Any] = {"kind": self.kind, "name": self.name, "args": _plain(args, f"arguments of {self.spec}")}
        if self.config is not None:
            out["config"] = _plain(dict(self.config), f"config of {self.spec}")
        return out


def _plain(value: Any, what: str) -> Any:
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{what} must hold plain values (numbers, strings, booleans, lists, dicts): {e}") from None


def _usage(text: str, problem: str) -> ConfigError:
    return ConfigError(f"model source {text!r}: {problem}. {forms_text()}; --list-sources shows them")


def _close(name: str, names: list[str]) -> str:
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.6)
    return f"; did you mean: {', '.join(close)}?" if close else ""


# ----------------------------------------------------------------------------------------------------------------------
# From a string


def get_source(spec: str | ModelSource, args: Mapping[str, Any] | None = None) -> ModelSource:
    """Parse and check a model source string (the forms of :func:`list_source_forms`); imports no user code.

    Raises:
        ConfigError: an unknown form, model name, class or directory, or arguments the form does not take;
            the message names the form and lists the valid ones.
    """
    args = dict(args or {})
    if isinstance(spec, ModelSource):
        return _checked(replace(spec, args={**spec.args, **args}) if args else spec)
    if not isinstance(spec, str) or not spec.strip():
        raise _usage(str(spec), "expected a non-empty string")
    text = spec.strip()
    prefix, sep, rest = text.partition(":")
    if not sep:
        return _timm_source(text, text, args)
    if prefix == "timm":
        return _timm_source(text, rest, args)
    if prefix == "torchvision":
        return _torchvision_source(text, rest, args)
    if prefix == "transformers":
        return _transformers_source(text, rest, args)
    if _BUILDER_RE.match(text):
        return ModelSource("builder", text, args)
    if prefix in ("hf-hub", "hf_hub", "local-dir"):
        raise _usage(text, f"timm's {prefix}: prefix loads weights from elsewhere; parc-surgery builds models offline")
    raise _usage(text, "not one of the forms (a builder is package.module:function, Python names only)")


def _checked(src: ModelSource) -> ModelSource:
    """``src`` checked as a string of its form would be (a source read from a file is checked the same way)."""
    recorded = [k for k in src.args if k in (*TIMM_FORBIDDEN_ARGS, *TORCHVISION_WEIGHT_ARGS)]
    if recorded and not src.trusted:
        raise ConfigError(f"the recorded arguments {recorded} of {src.spec!r} load weights or files: never honoured")
    if src.kind == "timm":
        _timm_source(src.spec, src.name, dict(src.args))
    elif src.kind == "torchvision":
        _torchvision_source(src.spec, src.name, dict(src.args))
    elif src.kind == "transformers":
        cls = get_transformers_class(src.name)
        if cls is None:
            raise _usage(src.spec, f"{src.name!r} is not a transformers model class")
        if src.config is None:
            _check_config_args(cls, src.args, src.spec)
    elif src.kind == "builder" and not _BUILDER_RE.match(src.name):
        raise _usage(src.name, "a builder is package.module:function, Python names only")
    return src


def _timm_source(text: str, name: str, args: dict) -> ModelSource:
    import timm

    from . import timm_models  # noqa: F401  (registers parcnet_s & co.)

    base = name.split(".", 1)[0]
    if not name or not timm.is_model(base):
        hint = _close(name, timm.list_models())
        raise _usage(
            text, f"unknown timm model {name!r}{hint} (timm.list_models('*{base.split('_')[0]}*') lists the names)"
        )
    bad = [k for k in args if k in TIMM_FORBIDDEN_ARGS]
    if bad:
        raise ConfigError(
            f"{', '.join(map(repr, bad))} cannot be a model argument of {text!r}: use --pretrained (pretrained=True "
            "in Python) for timm's weights; a saved model's weights come from its file"
        )
    return ModelSource("timm", name, args)


def _torchvision_source(text: str, name: str, args: dict) -> ModelSource:
    import torchvision

    names = torchvision.models.list_models()
    if name not in names:
        raise _usage(
            text, f"unknown torchvision model {name!r}{_close(name, names)} (torchvision.models.list_models())"
        )
    return ModelSource("torchvision", name, args)


def _transformers_source(text: str, rest: str, args: dict) -> ModelSource:
    cls = get_transformers_class(rest)
    if cls is not None:
        _check_config_args(cls, args, text)
        return ModelSource("transformers", rest, args)
    path = Path(rest).expanduser()
    if not rest or not path.is_dir():
        raise _usage(
            text, f"{rest!r} is neither a directory nor a transformers model class (ViTForImageClassification)"
        )
    if not (path / "config.json").is_file():
        raise _usage(text, f"the directory {rest!r} has no config.json")
    cls_name, config = read_transformers_dir(path, where=f"model source {text!r}")
    _check_config_args(get_transformers_class(cls_name), args, text)
    return ModelSource("transformers", cls_name, args, config=config, path=rest)


def _check_config_args(cls, args: Mapping[str, Any], where: str) -> None:
    if not args:
        return
    default = cls.config_class()
    unknown = [k for k in args if not hasattr(default, k)]
    if unknown:
        fields = sorted(default.to_dict())
        hints = "".join(_close(k, fields) for k in unknown)
        raise ConfigError(
            f"{where}: {', '.join(map(repr, unknown))} is not a field of {cls.config_class.__name__}{hints} "
            "(--model-arg sets config fields for a transformers source)"
        )


# ----------------------------------------------------------------------------------------------------------------------
# From a checkpoint manifest or a model


def source_from_manifest(entry: Any, *, where: str = "the manifest") -> ModelSource:
    """The source a checkpoint recorded (manifest format 1: a timm ``name`` and ``args``); never importable.

    A recorded builder comes back with ``trusted=False``: :func:`create_model` refuses it (a file never
    imports code); pass the model yourself (``load(path, model=...)``).
    """
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not isinstance(entry.get("args"), dict):
        raise ConfigError(f"{where}: the model source is malformed (tampered?)")
    kind = entry.get("kind", "timm")
    config = entry.get("config")
    if kind not in (*REBUILDABLE, "builder", "module") or (config is not None and not isinstance(config, dict)):
        raise ConfigError(f"{where}: unknown model source kind {kind!r} (tampered, or written by a newer version?)")
    return ModelSource(kind, entry["name"], dict(entry["args"]), config, None, trusted=False)


def source_of_model(model: nn.Module) -> ModelSource:
    """Where ``model`` came from: :func:`create_model`'s record, timm's ``pretrained_cfg``, a transformers
    model's class and config, else ``kind="module"`` (its class; such a model loads only through ``model=``)."""
    recorded = getattr(model, SOURCE_ATTR, None)
    if isinstance(recorded, ModelSource):
        return recorded
    cfg = getattr(model, "pretrained_cfg", None)
    arch = cfg.get("architecture") if isinstance(cfg, dict) else None
    if isinstance(arch, str):
        args = {k: v for k, v in (getattr(model, "_model_args", None) or {}).items() if k not in TIMM_FORBIDDEN_ARGS}
        with contextlib.suppress(ConfigError):  # not (or no longer) a registered timm name
            return _timm_source(arch, arch, args)
    cls = type(model)
    if cls.__module__.startswith("transformers.") and get_transformers_class(cls.__name__) is cls:
        return ModelSource("transformers", cls.__name__, {}, config=model.config.to_dict())
    return ModelSource("module", f"{cls.__module__}.{cls.__qualname__}")


# ----------------------------------------------------------------------------------------------------------------------
# Building


def create_model(source: str | ModelSource, *, meta: bool = False, pretrained: bool = False, **args: Any) -> nn.Module:
    """Build the model a source names (on the meta device with ``meta``: shapes, no weights).

    ``pretrained`` asks timm / torchvision for their pretrained weights (a download); a transformers
    directory's weights are loaded when present (offline) unless ``meta``. The model remembers its source
    (:func:`source_of_model`), so saving it records where it came from.

    Raises:
        ConfigError: bad source or arguments (the builder's module not found, unknown keyword arguments).
        ParcSurgeryError: the model's own code failed (its message says which source and why).
    """
    src = get_source(source, args)
    if pretrained and src.kind not in ("timm", "torchvision"):
        raise ConfigError(f"--pretrained (pretrained=True) applies to timm and torchvision sources, not {src.spec!r}")
    if src.kind == "module":
        raise ConfigError(f"{src.name!r} is a model class of unknown origin: build it yourself and pass the model")
    if src.kind == "builder" and not src.trusted:
        raise ConfigError(
            f"the file's model comes from the user builder {src.name!r}, and a file never imports code: pass the "
            f"unconverted model yourself (parc_surgery.load(path, model=...); CLI: --model {src.name})"
        )
    try:
        if meta:
            with torch.device("meta"):
                model = _build(src, meta=True, pretrained=False)
        else:
            model = _build(src, meta=False, pretrained=pretrained)
    except ParcSurgeryError:
        raise
    except TypeError as e:  # unknown keyword arguments, mostly
        raise ConfigError(f"building {src.spec!r} with {dict(src.args)} failed: {e} (check --model-arg)") from e
    except Exception as e:
        raise ParcSurgeryError(f"building {src.spec!r} with {dict(src.args)} failed: {type(e).__name__}: {e}") from e
    if not isinstance(model, nn.Module):
        raise ConfigError(f"{src.spec!r} returned a {type(model).__name__}, not a torch.nn.Module")
    setattr(model, SOURCE_ATTR, ModelSource(src.kind, src.name, dict(src.args), src.config, None))
    return model


def _build(src: ModelSource, *, meta: bool, pretrained: bool) -> Any:
    if src.kind == "timm":
        import timm

        return timm.create_model(src.name, pretrained=pretrained, **src.args)
    if src.kind == "torchvision":
        from torchvision.models import get_model

        args = dict(src.args)
        if meta:  # shapes only: weights are neither needed nor downloaded
            args = {k: v for k, v in args.items() if k not in TORCHVISION_WEIGHT_ARGS}
        elif pretrained:
            args.setdefault("weights", "DEFAULT")
        return get_model(src.name, **args)
    if src.kind == "transformers":
        return build_transformers(src, meta=meta)
    return _build_user(src)


@contextlib.contextmanager
def _cwd_on_path():
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        yield
    finally:
        if added:
            with contextlib.suppress(ValueError):
                sys.path.remove(cwd)


def _build_user(src: ModelSource) -> Any:
    module_name, _, attr = src.name.partition(":")
    with _cwd_on_path():
        importlib.invalidate_caches()  # files written since the last import are found
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name and (module_name == e.name or module_name.startswith(e.name + ".")):
                raise ConfigError(
                    f"model source {src.name!r} (form package.module:function): no module named {e.name!r} in the "
                    "current directory or the environment"
                ) from None
            raise
    fn: Any = module
    for part in attr.split("."):
        if not hasattr(fn, part):
            names = [n for n in dir(module) if not n.startswith("_")]
            raise ConfigError(f"model source {src.name!r}: {module_name} has no {attr!r}{_close(part, names)}")
        fn = getattr(fn, part)
    if not callable(fn):
        raise ConfigError(f"model source {src.name!r}: {attr!r} is a {type(fn).__name__}, not a function")
    return fn(**src.args)
