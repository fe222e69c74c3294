"""Allow-listed resolution of module class names used in rules (``select.type``).

A rule names module classes as text: a bare class name (``Bottleneck``) or a dotted path
(``timm.models.resnet.Bottleneck``, or a re-export such as ``torch.nn.Conv2d``). Names are only
ever *compared* with classes that are already loaded; nothing named in a rule is imported or
executed. Only classes defined in ``torch``, ``timm``, ``torchvision`` or ``parc_surgery``, and
classes registered from Python with :func:`register_type`, can be named or matched, so a rule can
never refer to ``os.system`` or ``builtins.eval``.
"""

from __future__ import annotations

import contextlib
import difflib
import re
import sys

from torch import nn

from .errors import ConfigError, RuleError

__all__ = [
    "ALLOWED_PACKAGES",
    "is_allowed_class",
    "is_allowed_type_name",
    "known_type_names",
    "register_type",
    "type_name_matches",
    "unregister_type",
    "validate_type_name",
]

ALLOWED_PACKAGES = ("torch", "timm", "torchvision", "transformers", "parc_surgery")

_REGISTERED: set[type] = set()
_BARE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_DOTTED_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+$")
_cache: dict[str, dict[str, type]] | None = None  # bare name -> {full name: class}


def _full_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _in_allowed_package(module: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in ALLOWED_PACKAGES)


def register_type(cls: type[nn.Module]) -> type[nn.Module]:
    """Allow rules to name and match ``cls`` (an ``nn.Module`` subclass); usable as a decorator."""
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ConfigError(f"register_type: expected an nn.Module subclass, got {cls!r}")
    global _cache
    _REGISTERED.add(cls)
    _cache = None
    return cls


def unregister_type(cls: type[nn.Module]) -> None:
    """Undo :func:`register_type` (for tests and user code that re-registers)."""
    global _cache
    _REGISTERED.discard(cls)
    _cache = None


def is_allowed_class(cls: type) -> bool:
    """Whether rules may match ``cls``: an nn.Module from an allowed package, or registered."""
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        return False
    return cls in _REGISTERED or _in_allowed_package(getattr(cls, "__module__", "") or "")


def is_allowed_type_name(name: str) -> bool:
    """Whether ``name`` is well formed and inside the allow-list (it need not exist).

    A bare class name is allowed (it only ever matches allowed classes); a dotted path must lie in
    an allowed package or be the full name of a registered class.
    """
    if not isinstance(name, str):
        return False
    if _BARE_RE.match(name):
        return True
    if not _DOTTED_RE.match(name):
        return False
    module = name.rpartition(".")[0]
    return _in_allowed_package(module) or any(_full_name(c) == name for c in _REGISTERED)


def _alias_target(name: str) -> type | None:
    """The class a dotted re-export names (``torch.nn.Conv2d``), from already-imported modules only."""
    module, _, attr = name.rpartition(".")
    mod = sys.modules.get(module)
    if mod is None:
        return None
    obj = vars(mod).get(attr)
    return obj if isinstance(obj, type) else None


def type_name_matches(cls: type, name: str, *, exact: bool = False) -> bool:
    """Whether ``cls`` (or, unless ``exact``, a class in its MRO) is the allowed class ``name`` names.

    ``name`` is a bare class name or a dotted path (the defining module's path, or a module that
    re-exports the class). Classes outside the allow-list never match.
    """
    if not isinstance(cls, type) or not isinstance(name, str):
        return False
    dotted = "." in name
    alias = _alias_target(name) if dotted else None
    for c in (cls,) if exact else cls.__mro__:
        if not is_allowed_class(c):
            continue
        if dotted:
            if c is alias or _full_name(c) == name:
                return True
        elif c.__name__ == name:
            return True
    return False


def _import_model_zoos() -> None:
    for mod in ("timm", "torchvision.models"):
        with contextlib.suppress(ImportError):  # optional: matching still works for whatever is loaded
            __import__(mod)


def known_type_names(*, refresh: bool = False) -> dict[str, dict[str, type]]:
    """Allowed nn.Module classes currently loaded: bare name -> {full dotted name: class}.

    Imports ``timm`` and ``torchvision.models`` (fixed, trusted packages) so their classes are known.
    """
    global _cache
    if _cache is not None and not refresh:
        return _cache
    _import_model_zoos()
    table: dict[str, dict[str, type]] = {}
    seen: set[type] = set()
    stack: list[type] = [nn.Module]
    while stack:
        cls = stack.pop()
        if cls in seen:
            continue
        seen.add(cls)
        # torch.fx makes a GraphModule subclass per traced class, named after it: not a real class
        if is_allowed_class(cls) and not cls.__module__.startswith("torch.fx."):
            table.setdefault(cls.__name__, {})[_full_name(cls)] = cls
        stack.extend(type.__subclasses__(cls))
    for cls in _REGISTERED:
        table.setdefault(cls.__name__, {})[_full_name(cls)] = cls
    _cache = table
    return table


def _close(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=3, cutoff=0.75)
    return f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""


def validate_type_name(name: str) -> None:
    """Raise :class:`RuleError` unless ``name`` names a loaded, allowed nn.Module class."""
    if not isinstance(name, str) or not (_BARE_RE.match(name) or _DOTTED_RE.match(name)):
        raise RuleError(
            f"{name!r} is not a class name: write a bare name ('Bottleneck') or a dotted path "
            "('timm.models.resnet.Bottleneck')"
        )
    if not is_allowed_type_name(name):
        raise RuleError(
            f"{name!r} is outside the allow-list: rules may only name nn.Module classes from "
            f"{', '.join(ALLOWED_PACKAGES)} or classes registered with parc_surgery.types.register_type()"
        )
    if "." in name and name.rpartition(".")[0] not in sys.modules:
        return  # its module is not imported, so no model can hold the class: nothing to check it against yet
    for refresh in (False, True):  # a miss re-walks once: classes may have been defined since
        table = known_type_names(refresh=refresh)
        if "." in name:
            alias = _alias_target(name)
            if (alias is not None and is_allowed_class(alias)) or name in table.get(name.rpartition(".")[2], {}):
                return
        elif name in table:
            return
    if "." in name:
        full_names = [f for entries in table.values() for f in entries]
        hint = _close(name, full_names)
        raise RuleError(f"no nn.Module class {name!r} is loaded from an allowed package.{hint}")
    hint = _close(name, list(table))
    raise RuleError(
        f"no nn.Module class named {name!r} in torch, timm, torchvision or the registered types.{hint} "
        "Register your own classes with parc_surgery.types.register_type(cls)."
    )
