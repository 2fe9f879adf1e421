"""Loading a Config: YAML files (safe_load), `model.preset`, dotted `key=value` overrides, type checks,
closest-key hints for unknown keys, and the CLI's `--config` / `--help-config` parsing."""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
import re
import sys
import typing
from pathlib import Path
from typing import Any, Mapping

import yaml

from llm_dist.config.schema import Config, ConfigError

# Float keys that may legitimately be +-inf (none today): every other float setting must be finite, since a
# nan or inf learning rate, coefficient or fraction passes every range check (nan compares False) and only
# fails, or silently trains garbage, much later.
NONFINITE_OK: frozenset[str] = frozenset()


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert one leaf value to the field's type (strings from the CLI are parsed here)."""
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no", "on", "off"):
            return value.lower() in ("true", "1", "yes", "on")
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        out = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out = float(value)
        elif isinstance(value, str):
            try:
                out = float(value)
            except ValueError:
                pass
        if out is not None:
            if not math.isfinite(out) and key not in NONFINITE_OK:
                raise ConfigError(f"{key}: expected a finite number, got {value!r}")
            return out
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    else:  # pragma: no cover - only the leaf types above are used in Config
        raise TypeError(f"unsupported config field type {tp} for {key}")
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def _fields(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _unknown_key(key: str, name: str, valid: list[str]) -> ConfigError:
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    hint = f"; did you mean {key.rsplit('.', 1)[0] + '.' if '.' in key else ''}{close[0]}?" if close else ""
    return ConfigError(f"unknown config key {key!r}{hint} (valid here: {', '.join(valid)})")


def flat_dict(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config dict -> {"train.batch_size": 8, ...}: dotted keys, leaf values as they are."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            out.update(flat_dict(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def apply_dict(obj: Any, data: dict, prefix: str = "") -> None:
    """Merge a nested dict into a dataclass instance in place, type-checking every leaf."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    fields = _fields(type(obj))
    for name, value in data.items():
        key = f"{prefix}{name}"
        if name not in fields:
            raise _unknown_key(key, str(name), list(fields))
        tp = fields[name]
        if dataclasses.is_dataclass(tp):
            apply_dict(getattr(obj, name), value, key + ".")
        else:
            setattr(obj, name, _coerce(value, tp, key))


def apply_override(cfg: Config, arg: str) -> None:
    """Apply one dotted `key=value` override, e.g. `optim.lr=3e-4` or `model.n_layer=6`."""
    if "=" not in arg:
        raise ConfigError(f"override {arg!r}: expected key=value, e.g. train.max_steps=100")
    key, raw = arg.split("=", 1)
    parts = key.strip().split(".")
    obj: Any = cfg
    for i, name in enumerate(parts):
        fields = _fields(type(obj))
        sub = ".".join(parts[: i + 1])
        if name not in fields:
            raise _unknown_key(sub, name, list(fields))
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(fields[name]):
                raise ConfigError(f"override {arg!r}: {sub} is a section; set one of its keys, e.g. {sub}.{next(iter(_fields(fields[name])))}=...")
            setattr(obj, name, _coerce(raw, fields[name], sub))
        else:
            if not dataclasses.is_dataclass(fields[name]):
                raise ConfigError(f"override {arg!r}: {sub} is a value, not a section")
            obj = getattr(obj, name)


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a mapping with the same key twice (PyYAML silently keeps the last)."""

    def construct_mapping(self, node, deep=False):  # noqa: ANN001, ANN201 - PyYAML's signature
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: merged keys may be overridden
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    if key in seen:
                        raise yaml.constructor.ConstructorError(
                            None, None, f"duplicate key {key!r} (first at line {seen[key]})", key_node.start_mark)
                    seen[key] = key_node.start_mark.line + 1
                except TypeError:  # an unhashable key: let SafeLoader report it as usual
                    continue
        return super().construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _UniqueKeyLoader.construct_mapping)


def safe_load_unique(text: str):  # noqa: ANN201 - whatever the YAML holds
    """`yaml.safe_load`, except that a duplicate mapping key raises yaml.YAMLError (naming key and line)."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def _read_yaml(path: str) -> dict:
    from llm_dist.bundled import config_file, shipped_configs

    path = config_file(path)  # a shipped config by name (`debug`, `configs/debug.yaml`) from any directory
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"config file {path}: is a directory; expected a YAML file")
    if not p.is_file():
        raise ConfigError(f"config file {path}: not found (shipped configs: {', '.join(shipped_configs())})")
    try:
        data = safe_load_unique(p.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path}: not UTF-8 text (byte {e.start}); expected a YAML file") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"config file {path}{where}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping of sections at the top level")
    return data


def load_config(path: str | None = None, overrides: list[str] | None = None, base: Config | None = None) -> Config:
    """Defaults (or `base`) < model preset < YAML < overrides. Does not validate (call `.validate`)."""
    from llm_dist.model.presets import get_preset  # local: config must import without the model package

    cfg = base if base is not None else Config()
    data = _read_yaml(path) if path else {}
    overrides = list(overrides or [])
    # The preset is applied first so that explicit keys (YAML or CLI) always win over it.
    preset = next((o.split("=", 1)[1] for o in reversed(overrides) if o.startswith("model.preset=")), None)
    if preset is None:
        preset = (data.get("model") or {}).get("preset") if isinstance(data.get("model"), dict) else None
    if preset:
        try:
            apply_dict(cfg.model, get_preset(str(preset)), "model.")
        except KeyError as e:
            raise ConfigError(f"model.preset: {e.args[0]}") from None
    try:
        apply_dict(cfg, data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    for o in overrides:
        apply_override(cfg, o)
    return cfg


def parse_args(argv: list[str] | None = None, default_config: str | None = None) -> Config:
    """`[--config PATH|NAME] [key=value ...]` -> Config (not yet validated). `--help` prints the keys.

    PATH is a YAML file; NAME a shipped config (`debug`, `configs/debug.yaml`: see llm_dist/bundled.py)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    path = default_config
    rest: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a in ("-h", "--help"):
            print(help_text())
            raise SystemExit(0)
        if a == "--config":
            if i + 1 >= len(argv):
                raise ConfigError("--config: expected a path after it")
            path = argv[i + 1]
            i += 2
            continue
        if a.startswith("--config="):
            path = a.split("=", 1)[1]
        elif a.startswith("--"):
            raise ConfigError(f"unknown option {a!r}; expected --config PATH or key=value overrides")
        else:
            rest.append(a)
        i += 1
    return load_config(path, rest)


_FIELD_LINE = re.compile(r"^\s*(\w+)\s*:[^=#]*=\s*(.*?)\s*#\s*(.*)$")


def field_comments(cls: type) -> dict[str, tuple[str, str]]:
    """field name -> (default as written in the source, its one-line comment) for a schema dataclass."""
    out: dict[str, tuple[str, str]] = {}
    for line in inspect.getsource(cls).splitlines():
        m = _FIELD_LINE.match(line)
        if m:
            out[m.group(1)] = (m.group(2), m.group(3))
    return out


def _help_lines(cls: type, prefix: str) -> list[str]:
    lines: list[str] = []
    comments = field_comments(cls)
    for name, tp in _fields(cls).items():
        if dataclasses.is_dataclass(tp):
            lines.extend(_help_lines(tp, f"{prefix}{name}."))
            continue
        default, comment = comments.get(name, (None, ""))
        if default is None:
            default = repr(next(f.default for f in dataclasses.fields(cls) if f.name == name))
        lines.append(f"{f'  {prefix}{name} = {default}':<44} # {comment}".rstrip())
    return lines


def help_text() -> str:
    """Every key with its default and comment, read from the dataclasses of `llm_dist/config/schema.py`."""
    head = ["usage: [--config PATH|NAME] [section.key=value ...]  (NAME: a shipped config, e.g. debug)", "",
            "Every key, its default and meaning (YAML sections or dotted key=value overrides):"]
    return "\n".join(head + _help_lines(Config, ""))
