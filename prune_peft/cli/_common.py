"""What every verb shares: the dataclass parser, config files, derived option dataclasses, user errors.

Options are dataclasses parsed by ``transformers.HfArgumentParser`` (each field's ``metadata["help"]`` is its
``--help`` line). A config file (``.yaml``/``.yml``/``.json``) given as the single positional argument or with
``--config FILE`` sets the defaults; flags on the command line override it, as ``trl.TrlParser`` does.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import typing
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

CONFIG_SUFFIXES = (".yaml", ".yml", ".json")


class UsageError(ValueError):
    """Bad command-line input: reported as one line, exit code 2, no traceback."""


def _parser_class():
    from transformers import HfArgumentParser

    class CliParser(HfArgumentParser):
        """HfArgumentParser whose argparse errors become :class:`UsageError` (argparse documents ``error`` as the
        method to override), so every verb reports bad input the same way: one line, exit code 2."""

        def error(self, message: str):
            raise UsageError(message)

    return CliParser


def split_config(argv: Sequence[str]) -> tuple[list[str], Path | None]:
    """Take the config file out of ``argv``: ``--config FILE``, ``--config=FILE`` or a leading ``FILE.yaml``."""
    argv = list(argv)
    path = None
    for i, arg in enumerate(argv):
        if arg == "--config":
            if i + 1 >= len(argv):
                raise UsageError("--config needs a file: --config FILE.yaml")
            path = argv[i + 1]
            del argv[i : i + 2]
            break
        if arg.startswith("--config="):
            path = arg.split("=", 1)[1]
            del argv[i]
            break
    if path is None and argv and not argv[0].startswith("-") and argv[0].lower().endswith(CONFIG_SUFFIXES):
        path = argv.pop(0)
    return argv, (Path(path) if path is not None else None)


def read_config(path: Path) -> dict[str, Any]:
    """A YAML/JSON mapping of option name → value (names as in the dataclasses, e.g. ``learning_rate``)."""
    if path.suffix.lower() not in CONFIG_SUFFIXES:
        raise UsageError(f"config file {str(path)!r} must end in .yaml, .yml or .json")
    if not path.is_file():
        raise UsageError(f"config file {str(path)!r} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UsageError(f"config file {str(path)!r} is not valid JSON: {exc}") from None
    else:
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise UsageError(f"config file {str(path)!r} is not valid YAML: {' '.join(str(exc).split())}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"config file {str(path)!r} must hold a mapping of option names to values")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def option_names(types: Iterable[type]) -> set[str]:
    return {f.name for t in types for f in dataclasses.fields(t) if f.init}


def parse_options(
    prog: str, types: Sequence[type], argv: Sequence[str], *, description: str, config: dict[str, Any] | None = None
) -> tuple:
    """Parse ``argv`` (config file defaults already read into ``config``) into one instance of each of ``types``."""
    parser = _parser_class()(list(types), prog=prog, description=description)
    if config:
        # a short flag (--out, --lr) also works as a key: out: runs/x
        spelled = {
            alias.lstrip("-").replace("-", "_"): f.name
            for t in types
            for f in dataclasses.fields(t)
            for alias in _as_list(f.metadata.get("aliases"))
        }
        config = {spelled.get(k, k): v for k, v in config.items()}
        unknown = sorted(set(config) - option_names(types))
        if unknown:
            raise UsageError(f"config file: unknown option(s) {unknown}; see `{prog} --help` for the names")
        parser.set_defaults(**config)  # flags given on the command line still win
    return parser.parse_args_into_dataclasses(list(argv), look_for_args_file=False)


def _as_list(aliases: str | list[str] | None) -> list[str]:
    return [aliases] if isinstance(aliases, str) else list(aliases or [])


def _copy_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def derived_options(
    cls: type,
    names: Sequence[str],
    *,
    name: str,
    prefix: str = "",
    optional: bool = False,
    types: dict[str, Any] | None = None,
    defaults: dict[str, Any] | None = None,
    aliases: dict[str, list[str]] | None = None,
    help_suffix: dict[str, str] | None = None,
    group: str | None = None,
) -> type:
    """A dataclass of the user-facing fields ``names`` of the config dataclass ``cls``, for the parser.

    Type, default and help text come from ``cls`` itself, so the CLI never re-declares what a config already
    says. Needed because the configs cannot be handed to HfArgumentParser whole: peft's ``LoraConfig`` has fields
    typed ``Union[list[int], int]`` / ``Union[list[str], str]`` (``layers_to_transform``, ``target_modules``), which
    the parser refuses, and most of its fields are not meant for a command line. ``optional=True`` makes every
    field default to ``None`` ("not given") so the caller can tell which ones the user set. ``types`` replaces a
    field's type (for the Union-typed ones), ``defaults`` its default, ``aliases`` adds flag spellings, ``group``
    titles the options' section in ``--help``.
    """
    types, defaults, aliases, help_suffix = types or {}, defaults or {}, aliases or {}, help_suffix or {}
    hints = typing.get_type_hints(cls)
    by_name = {f.name: f for f in dataclasses.fields(cls)}
    specs = []
    for field_name in names:
        f = by_name[field_name]
        typ = types.get(field_name, hints[field_name])
        if field_name in defaults:
            default = defaults[field_name]
        elif optional:
            default = None
        else:
            default = _copy_default(f)
        if default is None and typing.get_origin(typ) is not typing.Union:
            typ = typing.Optional[typ]
        metadata = {"help": f.metadata.get("help", "")}  # peft adds keys (is_lora_variant) argparse refuses
        if field_name in help_suffix:
            metadata["help"] = f"{metadata.get('help', '').rstrip()} {help_suffix[field_name]}".strip()
        if field_name in aliases:
            metadata["aliases"] = aliases[field_name]
        if isinstance(default, (list, dict)):
            spec = dataclasses.field(default_factory=lambda v=default: copy.deepcopy(v), metadata=metadata)
        else:
            spec = dataclasses.field(default=default, metadata=metadata)
        specs.append((prefix + field_name, typ, spec))
    namespace = {"_argument_group_name": group} if group else None  # HfArgumentParser's --help section title
    return dataclasses.make_dataclass(name, specs, namespace=namespace)


def given(options: Any, prefix: str = "") -> dict[str, Any]:
    """The fields of a ``derived_options(..., optional=True)`` instance that were set, without ``prefix``."""
    return {
        f.name[len(prefix) :]: getattr(options, f.name)
        for f in dataclasses.fields(options)
        if getattr(options, f.name) is not None
    }


def check_positive(values: dict[str, Any]) -> None:
    """``{"--flag": value}``: each must be a positive integer (bool excluded)."""
    for flag, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise UsageError(f"{flag} must be a positive integer, got {value!r}")


def check_data_spec(flag: str, spec: str) -> None:
    """Built-in offline data ('arithmetic', 'shakespeare') or a ``save_to_disk`` folder."""
    if spec not in ("arithmetic", "shakespeare") and not os.path.isdir(spec):
        raise UsageError(f"{flag} must be 'arithmetic', 'shakespeare' or a saved dataset folder, got {spec!r}")


def print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))
