"""Typed configuration dataclasses and the machinery that turns them into CLI options.

A config is a ``@dataclass`` whose fields each carry a one-line docstring (a string literal right
under the field). :func:`add_config_arguments` reads those docstrings to build ``--help``, so the
CLI and the Python API can never drift apart. Invalid combinations fail in ``__post_init__``.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import textwrap
import types
import typing
from functools import cache
from typing import Any, Literal, TypeVar, get_args, get_origin

T = TypeVar("T")


@cache
def field_docs(cls: type) -> dict[str, str]:
    """Map each field of a dataclass to the docstring written under it (inherited ones too)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass) or klass is object:
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        body = ast.parse(source).body[0]
        if not isinstance(body, ast.ClassDef):
            continue
        statements = body.body
        for stmt, nxt in zip(statements, statements[1:], strict=False):
            if (
                isinstance(stmt, ast.AnnAssign)
                and isinstance(stmt.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return docs


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _split_list(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


_SCALARS: tuple[type, ...] = (int, float, str)


def _optional_scalar(kind: type) -> Any:
    """argparse type that reads 'none' as None (for ``X | None`` fields)."""

    def parse(value: str) -> Any:
        return None if value.lower() == "none" else kind(value)

    parse.__name__ = kind.__name__
    return parse


def add_config_arguments(
    parser: argparse.ArgumentParser,
    cls: type,
    *,
    aliases: dict[str, list[str]] | None = None,
    positional: tuple[str, ...] = (),
    exclude: tuple[str, ...] = (),
) -> None:
    """Add one option per dataclass field, with the field's docstring as help text.

    Supported field types: ``int``, ``float``, ``str``, ``bool`` (``--flag/--no-flag``),
    ``Literal[...]`` (choices), ``list[int|float|str]`` (repeated flags and comma-separated
    values) and ``X | None`` of a scalar (``none`` on the command line). Any other type is a
    programming error and raises ``TypeError`` when the parser is built.
    """
    aliases = aliases or {}
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in exclude or not f.init:
            continue
        tp, optional = _unwrap_optional(hints[f.name])
        default = (
            f.default
            if f.default is not dataclasses.MISSING
            else (f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        )
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        help_text = docs.get(f.name, "")
        if not required and default not in (None, "", []):
            help_text += f" (default: {_show(default)})"
        kwargs: dict[str, Any] = {"help": help_text.replace("%", "%%"), "dest": f.name}
        origin = get_origin(tp)
        if tp is bool and not optional:
            kwargs["action"] = argparse.BooleanOptionalAction
            kwargs["default"] = default
        elif origin is list and get_args(tp) and get_args(tp)[0] in _SCALARS:
            kwargs["action"] = _ExtendSplitAction
            kwargs["type"] = get_args(tp)[0]
            kwargs["default"] = None
            kwargs["metavar"] = f.name.upper().rstrip("S")
        elif origin is Literal:
            choices = list(get_args(tp))
            kwargs["choices"] = choices
            kwargs["type"] = type(choices[0])
            kwargs["default"] = default
        elif tp in _SCALARS:
            kwargs["type"] = _optional_scalar(tp) if optional else tp
            kwargs["default"] = default
            kwargs["metavar"] = f.name.upper()
        else:
            raise TypeError(
                f"{cls.__name__}.{f.name}: field type {hints[f.name]} has no command-line form"
            )
        if f.name in positional:
            kwargs.pop("dest")
            if not required:
                kwargs["nargs"] = "?"
            parser.add_argument(f.name, **kwargs)
            continue
        flags = [*aliases.get(f.name, []), "--" + f.name.replace("_", "-")]
        if required and not optional:
            kwargs["required"] = True
        parser.add_argument(*flags, **kwargs)


def config_from_args(cls: type[T], args: argparse.Namespace) -> T:
    """Build a config from parsed arguments; unset list options fall back to field defaults."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if not f.init or not hasattr(args, f.name):
            continue
        value = getattr(args, f.name)
        if value is None and f.default_factory is not dataclasses.MISSING:
            continue  # an unset list option keeps the field's default
        values[f.name] = value
    return cls(**values)


def validate_literals(config: Any) -> None:
    """Raise ConfigError for a ``Literal`` field holding a value outside its choices."""
    from saeguard.errors import ConfigError

    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        tp, optional = _unwrap_optional(hints[f.name])
        value = getattr(config, f.name)
        if get_origin(tp) is Literal and not (optional and value is None):
            choices = get_args(tp)
            if value not in choices:
                raise ConfigError(
                    f"--{f.name.replace('_', '-')} must be one of "
                    f"{', '.join(map(str, choices))}; got {value!r}"
                )


def config_to_dict(config: Any) -> dict[str, Any]:
    """JSON-ready dict of a config dataclass."""
    return dataclasses.asdict(config)


def _show(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return str(value)


class _ExtendSplitAction(argparse.Action):
    """Accumulate values from repeated flags, each of which may hold a comma-separated list."""

    def __init__(self, *args: Any, type: Any = str, **kwargs: Any) -> None:  # noqa: A002
        super().__init__(*args, **kwargs)  # argparse must not convert the raw "a,b" string
        self.item_type = type

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        try:
            items = [self.item_type(v) for v in _split_list(str(values))]
        except ValueError as exc:
            raise argparse.ArgumentError(self, f"invalid value {values!r}: {exc}") from exc
        current = getattr(namespace, self.dest, None) or []
        setattr(namespace, self.dest, [*current, *items])
