"""Config helpers shared by ``configs/*.py``.

A config is one ``ml_collections.ConfigDict`` with sections ``model``, ``data``,
``retrieval``, ``train``, ``mesh`` and ``generate``. Config files define ``get_config(arg)``;
``--config configs/NAME.py:ARG`` passes ``ARG`` (big_vision style), and
``--config.KEY=VALUE`` overrides any field.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import ml_collections


def load_config(spec: str) -> ml_collections.ConfigDict:
    """``path/to/config.py[:arg]`` -> ConfigDict."""
    path, _, arg = spec.partition(":")
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    root = str(file.resolve().parent.parent)  # configs/x.py may import configs.common
    if root not in sys.path:
        sys.path.insert(0, root)
    module_spec = importlib.util.spec_from_file_location(f"ravlm_config_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"config file {path} defines no get_config()")
    return module.get_config(arg) if arg else module.get_config()


def _parse_value(text: str, like: Any) -> Any:
    if isinstance(like, bool):
        if text.lower() in ("1", "true", "yes"):
            return True
        if text.lower() in ("0", "false", "no"):
            return False
        raise ValueError(f"expected a boolean, got {text!r}")
    if isinstance(like, int) and not isinstance(like, bool):
        return int(text)
    if isinstance(like, float):
        return float(text)
    if isinstance(like, str):
        return text
    if isinstance(like, (tuple, list)) or like is None:
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            return text
        return tuple(value) if isinstance(like, tuple) and isinstance(value, list) else value
    raise ValueError(f"cannot override a field of type {type(like).__name__}")


def apply_overrides(config: ml_collections.ConfigDict, overrides: list[str]
                    ) -> ml_collections.ConfigDict:
    """Apply ``KEY=VALUE`` (dotted keys) overrides; unknown keys are an error."""
    config = config.copy_and_resolve_references()
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} is not KEY=VALUE")
        node = config
        parts = key.split(".")
        for p in parts[:-1]:
            if p not in node:
                raise KeyError(f"unknown config key {key!r}")
            node = node[p]
        if parts[-1] not in node:
            raise KeyError(f"unknown config key {key!r}")
        node[parts[-1]] = _parse_value(text, node[parts[-1]])
    return config


def to_json(config: ml_collections.ConfigDict) -> str:
    return config.to_json_best_effort(indent=2, sort_keys=True)
