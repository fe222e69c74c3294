"""transformers models as a model source: the library's own classes, config.json directories, offline loading.

Only classes that ``transformers`` itself exports are used (a config's ``auto_map`` remote code never is);
weights are read from safetensors files only, with ``local_files_only`` (nothing is downloaded, nothing
unpickled). :mod:`parc_surgery.sources` holds the notion of a source; this module the transformers details.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from .errors import ConfigError

__all__ = ["build_transformers", "get_transformers_class", "read_transformers_dir"]


def get_transformers_class(name: str) -> type | None:
    """The ``transformers`` model class called ``name`` (only the library's own classes), or ``None``."""
    if not (isinstance(name, str) and name.isidentifier()):
        return None
    import transformers

    try:
        cls = getattr(transformers, name, None)
    except Exception:  # the lazy module could not import that class's dependencies
        return None
    return cls if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel) else None


def read_transformers_dir(path: Path, *, where: str) -> tuple[str, dict[str, Any]]:
    """The model class name and the ``config.json`` contents of a ``save_pretrained`` directory."""
    cfg_file = path / "config.json"
    try:
        config = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ConfigError(f"{where}: cannot read {str(cfg_file)!r}: {e}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{where}: {str(cfg_file)!r} does not hold a JSON object")
    return _class_for_config(config, where), config


def _class_for_config(config: Mapping[str, Any], where: str) -> str:
    archs = config.get("architectures") or []
    if archs:
        name = archs[0]
        if get_transformers_class(name) is None:
            remote = (
                " (its auto_map asks for remote code, which parc-surgery never runs)" if "auto_map" in config else ""
            )
            raise ConfigError(
                f"{where}: config.json names architecture {name!r}, which is not a transformers model class{remote}; "
                "build the model in Python and pass it to parc_surgery.convert"
            )
        return name
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

    name = MODEL_MAPPING_NAMES.get(config.get("model_type", ""))
    if not isinstance(name, str) or get_transformers_class(name) is None:
        raise ConfigError(
            f"{where}: config.json names no architectures and its model_type {config.get('model_type')!r} is not one "
            "AutoModel knows"
        )
    return name


def build_transformers(src, *, meta: bool) -> nn.Module:
    """The model a transformers source (``name``, ``args``, ``config``, ``path``) describes.

    Built from the config (``config`` updated with ``args``, else ``args`` alone); the weights of ``path``
    are loaded (offline, safetensors only) unless ``meta``.
    """
    cls = get_transformers_class(src.name)
    if cls is None:
        raise ConfigError(f"{src.name!r} is not a transformers model class (tampered manifest or another version?)")
    config = cls.config_class.from_dict({**src.config, **src.args}) if src.config is not None else None
    if config is None:
        config = cls.config_class(**src.args)
    path = Path(src.path).expanduser() if src.path else None
    if path is None or meta:
        return cls(config)
    weights = [p.name for p in path.iterdir() if p.name.endswith((".safetensors", ".safetensors.index.json"))]
    if not weights:
        if any(p.suffix in (".bin", ".pt", ".pth", ".ckpt") for p in path.iterdir()):
            raise ConfigError(
                f"{src.spec!r}: the directory holds only pickled weights (.bin/.pt), which parc-surgery never loads; "
                "save them as safetensors (model.save_pretrained(dir, safe_serialization=True))"
            )
        return cls(config)  # a config only: freshly initialised weights
    return cls.from_pretrained(str(path), config=config, local_files_only=True, use_safetensors=True)
