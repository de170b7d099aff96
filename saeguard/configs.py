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


@dataclasses.dataclass(frozen=True)
class OptionSpec:
    """One command-line option of a config: where its value goes and how it is shown."""

    dest: str
    """Dotted path of the field from the top config (``monitor.fit_texts``)."""
    hint: Any
    """The field's type."""
    default: Any
    """The value the option takes when it is not given (shown in ``--help``)."""
    required: bool
    """Whether the field has no default."""
    doc: str
    """The field's one-line docstring."""


EXTRA_OPTIONS = "extra_options"
"""Metadata key of a ``dict[str, Any]`` field whose options come from a provider function
(e.g. the architecture-specific SAE settings: one flag per setting any registered architecture
declares). The provider returns ``{name: (dataclasses.Field, type hint, docstring, owners)}``."""


def _field_default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _nested_class(tp: Any) -> type | None:
    tp, _ = _unwrap_optional(tp)
    return tp if isinstance(tp, type) and dataclasses.is_dataclass(tp) else None


def option_specs(cls: type, exclude: tuple[str, ...] = ()) -> list[OptionSpec]:
    """Every leaf setting of a (nested) config, in field order, defaults taken from the parent
    config's default for each sub-config (one default per setting, wherever it is declared)."""
    specs: list[OptionSpec] = []

    def walk(klass: type, prefix: str, defaults: Any) -> None:
        docs = field_docs(klass)
        hints = typing.get_type_hints(klass)
        for f in dataclasses.fields(klass):
            dest = prefix + f.name
            if not f.init or dest in exclude:
                continue
            default = getattr(defaults, f.name) if defaults is not None else _field_default(f)
            nested = _nested_class(hints[f.name])
            if nested is not None:
                walk(nested, dest + ".", default)
                continue
            if EXTRA_OPTIONS in f.metadata:
                for name, (extra, hint, doc, owners) in f.metadata[EXTRA_OPTIONS]().items():
                    specs.append(OptionSpec(f"{dest}.{name}", hint, _field_default(extra), False,
                                            f"{doc} ({', '.join(owners)})"))  # fmt: skip
                continue
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            specs.append(OptionSpec(dest, hints[f.name], default, required, docs.get(f.name, "")))

    walk(cls, "", None)
    return specs


def add_config_arguments(
    parser: argparse.ArgumentParser,
    cls: type,
    *,
    aliases: dict[str, list[str]] | None = None,
    positional: tuple[str, ...] = (),
    exclude: tuple[str, ...] = (),
) -> None:
    """Add one option per setting of a config, with the field's docstring as help text.

    A field holding another config adds that config's settings as ``--sub.name`` (grouped under
    the sub-config's name), plus the flat ``--name`` when no other setting has that name.
    ``aliases`` and ``exclude`` take dotted names. Supported field types: ``int``, ``float``,
    ``str``, ``bool`` (``--flag/--no-flag``), ``Literal[...]`` (choices),
    ``list[int|float|str]`` (repeated flags and comma-separated values) and ``X | None`` of a
    scalar (``none`` on the command line). Any other type is a programming error and raises
    ``TypeError`` when the parser is built.
    """
    aliases = aliases or {}
    specs = option_specs(cls, exclude)
    leaf_names: dict[str, int] = {}
    for spec in specs:
        leaf = spec.dest.rpartition(".")[2]
        leaf_names[leaf] = leaf_names.get(leaf, 0) + 1
    groups: dict[str, Any] = {}
    for spec in specs:
        prefix, _, leaf = spec.dest.rpartition(".")
        target: Any = parser
        if prefix:
            if prefix not in groups:
                groups[prefix] = parser.add_argument_group(f"{prefix} settings")
            target = groups[prefix]
        kwargs = _argument_kwargs(cls, spec)
        if prefix:
            kwargs["default"] = argparse.SUPPRESS  # unset: the parent config's default stands
        if spec.dest in positional:
            kwargs.pop("dest")
            if kwargs.get("action") is _ExtendSplitAction:  # a list: one or more words
                nargs = "+" if spec.required else "*"
                kwargs = {k: kwargs[k] for k in ("help", "type", "metavar")} | {"nargs": nargs}
            elif not spec.required:
                kwargs["nargs"] = "?"
            target.add_argument(spec.dest, **kwargs)
            continue
        flags = [*aliases.get(spec.dest, [])]
        if prefix and leaf_names[leaf] == 1:
            flags.append("--" + leaf.replace("_", "-"))
        flags.append("--" + spec.dest.replace("_", "-"))
        if spec.required and not _unwrap_optional(spec.hint)[1]:
            kwargs["required"] = True
        target.add_argument(*flags, **kwargs)


def _argument_kwargs(cls: type, spec: OptionSpec) -> dict[str, Any]:
    tp, optional = _unwrap_optional(spec.hint)
    default = spec.default
    help_text = spec.doc
    if not spec.required and default not in (None, "", []):
        help_text += f" (default: {_show(default)})"
    kwargs: dict[str, Any] = {"help": help_text.replace("%", "%%"), "dest": spec.dest}
    origin = get_origin(tp)
    if tp is bool and not optional:
        kwargs["action"] = argparse.BooleanOptionalAction
        kwargs["default"] = default
    elif origin is list and get_args(tp) and get_args(tp)[0] in _SCALARS:
        kwargs["action"] = _ExtendSplitAction
        kwargs["type"] = get_args(tp)[0]
        kwargs["default"] = None
        kwargs["metavar"] = spec.dest.rpartition(".")[2].upper().rstrip("S")
    elif origin is Literal:
        choices = list(get_args(tp))
        kwargs["choices"] = choices
        kwargs["type"] = type(choices[0])
        kwargs["default"] = default
    elif tp in _SCALARS:
        kwargs["type"] = _optional_scalar(tp) if optional else tp
        kwargs["default"] = default
        kwargs["metavar"] = spec.dest.rpartition(".")[2].upper()
    else:
        raise TypeError(
            f"{cls.__name__}.{spec.dest}: field type {spec.hint} has no command-line form"
        )
    return kwargs


def config_from_args(cls: type[T], args: argparse.Namespace) -> T:
    """Build a (nested) config from parsed arguments: settings that were not given keep their
    default, a sub-config's being the one its parent config declares."""
    return typing.cast(T, _build(cls, vars(args), "", None))


def _build(cls: type, given: dict[str, Any], prefix: str, base: Any) -> Any:
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        dest = prefix + f.name
        nested = _nested_class(hints[f.name])
        if nested is not None:
            sub_base = getattr(base, f.name) if base is not None else _field_default(f)
            values[f.name] = _build(nested, given, dest + ".", sub_base)
        elif EXTRA_OPTIONS in f.metadata:
            extra = {k[len(dest) + 1 :]: v for k, v in given.items() if k.startswith(dest + ".")}
            current = getattr(base, f.name) if base is not None else _field_default(f)
            values[f.name] = {**(current or {}), **extra}
        elif dest in given and not (
            given[dest] is None and f.default_factory is not dataclasses.MISSING
        ):
            values[f.name] = given[dest]  # an unset list option (None) keeps the default
        elif base is not None:
            values[f.name] = getattr(base, f.name)
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
