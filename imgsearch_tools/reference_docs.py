"""Reference pages of the docs site, generated from the code so they cannot drift.

The CLI page comes from the `imgsearch` argparse parser, the configuration page from
:data:`imgsearch.settings.SETTINGS`, the gRPC API page from the comments in ``protos/``
(read through protoc's source info). The site's build hook calls :func:`reference_pages`;
the ``undocumented_*`` functions are what the tests hold the code to.
"""

from __future__ import annotations

import argparse
import importlib.resources
import tempfile
from pathlib import Path

# FileDescriptorProto field numbers used in source-info paths (descriptor.proto).
_MESSAGE, _ENUM, _SERVICE = 4, 5, 6
_FIELD, _NESTED, _NESTED_ENUM = 2, 3, 4
_ENUM_VALUE, _METHOD = 2, 2


def _cell(text: str) -> str:
    """One Markdown table cell: one line, pipes and angle brackets escaped."""
    parts = " ".join(str(text).split()).replace("|", "\\|").split("`")
    # Angle brackets would read as HTML outside code spans; inside them they show as written.
    for i in range(0, len(parts), 2):
        parts[i] = parts[i].replace("<", "&lt;").replace(">", "&gt;")
    return "`".join(parts)


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _command_help(parser: argparse.ArgumentParser) -> dict[str, str]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {choice.dest: choice.help or "" for choice in action._choices_actions}


def _arguments(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if not isinstance(a, argparse._HelpAction)]


def undocumented_cli_arguments(parser: argparse.ArgumentParser | None = None) -> list[str]:
    """``COMMAND ARGUMENT`` for every subcommand or argument without help text."""
    parser = parser or _default_parser()
    helps = _command_help(parser)
    missing = []
    for name, sub in _subcommands(parser).items():
        if not (helps.get(name) or sub.description):
            missing.append(f"{name} (the command itself)")
        for action in _arguments(sub):
            if not action.help or action.help == argparse.SUPPRESS:
                missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}")
    return missing


def _default_parser() -> argparse.ArgumentParser:
    from imgsearch_tools.cli import build_parser

    return build_parser()


def cli_markdown(parser: argparse.ArgumentParser | None = None) -> str:
    """The CLI reference: every subcommand, its usage, and each argument with its help."""
    parser = parser or _default_parser()
    helps = _command_help(parser)
    lines = [
        "# Command line",
        "",
        "Generated from the `imgsearch` command's own parser (`imgsearch_tools/cli.py`) when the",
        "site is built; `imgsearch COMMAND --help` prints the same.",
        "",
    ]
    for name, sub in _subcommands(parser).items():
        formatter = sub._get_formatter()
        lines += [f"## `imgsearch {name}`", "", _cell(helps.get(name) or ""), ""]
        if sub.description:
            lines += [" ".join(sub.description.split()), ""]
        lines += ["```text", sub.format_usage().strip(), "```", ""]
        rows = []
        for action in _arguments(sub):
            flags = ", ".join(f"`{o}`" for o in action.option_strings) or f"`{action.dest}`"
            default = action.default
            shown = (
                ""
                if default in (None, False, argparse.SUPPRESS) or not action.option_strings
                else f"`{default}`"
            )
            meaning = _cell(formatter._expand_help(action)) if action.help else ""
            rows.append(f"| {flags} | {meaning} | {shown} |")
        if rows:
            lines += ["| argument | meaning | default |", "|---|---|---|", *rows, ""]
    return "\n".join(lines)


def settings_markdown() -> str:
    """The configuration reference: every ``IMGSEARCH_*`` variable from the settings table."""
    from imgsearch.config import ENV_PREFIX
    from imgsearch.settings import SETTINGS

    lines = [
        "# Configuration",
        "",
        "Generated from `imgsearch/settings.py`, the table of every environment variable the",
        "code reads. Precedence: a command-line flag (`imgsearch serve --help`), then the",
        "variable, then the default. The service ports carry each service's API, health and",
        "(per `IMGSEARCH_REFLECTION`) reflection; the admin ports carry `AdminService` and",
        "health, always in plaintext so that Kubernetes' gRPC probes reach them.",
        "",
        "| variable | meaning | default | read by |",
        "|---|---|---|---|",
    ]
    for setting in SETTINGS:
        lines.append(
            f"| `{ENV_PREFIX}{setting.name}` | {_cell(setting.description)} | "
            f"{_cell(setting.default)} | {_cell(setting.read_by)} |"
        )
    return "\n".join(lines) + "\n"


def undocumented_settings(names_read: set[str]) -> list[str]:
    """Names (without the prefix) in ``names_read`` that have no row or an empty one."""
    from imgsearch.settings import SETTINGS

    documented = {s.name for s in SETTINGS if s.description.strip() and s.default.strip()}
    return sorted(names_read - documented)


def proto_files(proto_root: str | Path = "protos") -> list[Path]:
    """Every ``.proto`` file under ``proto_root``, sorted."""
    return sorted(Path(proto_root).rglob("*.proto"))


def _descriptor_set(proto_root: Path):
    """Compile the protos with their comments (source info) into a FileDescriptorSet."""
    from google.protobuf import descriptor_pb2
    from grpc_tools import protoc

    well_known = importlib.resources.files("grpc_tools") / "_proto"
    files = [str(p.relative_to(proto_root)) for p in proto_files(proto_root)]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "protos.pb"
        status = protoc.main(
            [
                "protoc",
                f"-I{proto_root}",
                f"-I{well_known}",
                "--include_source_info",
                f"--descriptor_set_out={out}",
                *files,
            ]
        )
        if status != 0:
            raise RuntimeError(f"protoc failed on {proto_root} (exit {status})")
        return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


def _comments(file_proto) -> dict[tuple[int, ...], str]:
    comments = {}
    for location in file_proto.source_code_info.location:
        text = location.leading_comments.strip()
        if text:
            comments[tuple(location.path)] = " ".join(text.split())
    return comments


def _elements(file_proto):
    """Yield (kind, full name, path, proto) for every documented element of one file."""
    package = file_proto.package

    def messages(protos, prefix, path):
        for i, message in enumerate(protos):
            if message.options.map_entry:  # protoc's synthetic type of a map<K, V> field
                continue
            name = f"{prefix}.{message.name}"
            here = (*path, i)
            yield "message", name, here, message
            for j, field in enumerate(message.field):
                yield "field", f"{name}.{field.name}", (*here, _FIELD, j), field
            yield from enums(message.enum_type, name, (*here, _NESTED_ENUM))
            yield from messages(message.nested_type, name, (*here, _NESTED))

    def enums(protos, prefix, path):
        for i, enum in enumerate(protos):
            name = f"{prefix}.{enum.name}"
            yield "enum", name, (*path, i), enum
            for j, value in enumerate(enum.value):
                yield "value", f"{name}.{value.name}", (*path, i, _ENUM_VALUE, j), value

    for i, service in enumerate(file_proto.service):
        name = f"{package}.{service.name}"
        yield "service", name, (_SERVICE, i), service
        for j, method in enumerate(service.method):
            yield "rpc", f"{name}.{method.name}", (_SERVICE, i, _METHOD, j), method
    yield from messages(file_proto.message_type, package, (_MESSAGE,))
    yield from enums(file_proto.enum_type, package, (_ENUM,))


def undocumented_proto_elements(proto_root: str | Path = "protos") -> list[str]:
    """Full names of services, RPCs, messages, fields, enums and values without a comment."""
    missing = []
    for file_proto in _descriptor_set(Path(proto_root)).file:
        comments = _comments(file_proto)
        missing += [name for _, name, path, _ in _elements(file_proto) if path not in comments]
    return missing


def _map_entries(descriptor_set) -> dict[str, str]:
    """``map<K, V>`` by the full name of protoc's synthetic entry type of each map field."""
    maps = {}

    def walk(protos, prefix):
        for message in protos:
            name = f"{prefix}.{message.name}"
            if message.options.map_entry:
                key, value = (_type_name(f, {}) for f in message.field)
                maps[name] = f"map<{key}, {value}>"
            walk(message.nested_type, name)

    for file_proto in descriptor_set.file:
        walk(file_proto.message_type, file_proto.package)
    return maps


def _type_name(field, maps: dict[str, str]) -> str:
    from google.protobuf import descriptor_pb2

    if field.type_name.lstrip(".") in maps:
        return maps[field.type_name.lstrip(".")]
    if field.type_name:
        name = field.type_name.lstrip(".")
    else:
        name = descriptor_pb2.FieldDescriptorProto.Type.Name(field.type)[5:].lower()
    if field.label == descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED:
        return f"repeated {name}"
    return name


def grpc_markdown(proto_root: str | Path = "protos") -> str:
    """The gRPC API reference: every service, RPC, message and enum with its comment."""
    lines = [
        "# gRPC API",
        "",
        "Generated from the comments in `protos/` when the site is built (protoc's source",
        "info). Status codes each method answers are in the [serving guide](../guides/serving.md).",
        "",
    ]
    descriptor_set = _descriptor_set(Path(proto_root))
    maps = _map_entries(descriptor_set)
    for file_proto in descriptor_set.file:
        comments = _comments(file_proto)
        lines += [f"## `{file_proto.package}`", "", f"File: `protos/{file_proto.name}`", ""]
        table: list[str] = []
        in_section = False
        for kind, name, path, proto in _elements(file_proto):
            comment = _cell(comments.get(path, ""))
            if kind in ("field", "value", "rpc"):
                if kind == "rpc":
                    cells = f"`{proto.name}` | `{proto.input_type.lstrip('.')}` → "
                    cells += f"`{proto.output_type.lstrip('.')}`"
                elif kind == "field":
                    cells = f"`{proto.name}` | `{_type_name(proto, maps)}` = {proto.number}"
                else:
                    cells = f"`{proto.name}` | {proto.number}"
                table.append(f"| {cells} | {comment} |")
                continue
            if in_section:
                lines += _flush(table)
            in_section = True
            head = {
                "service": "rpc | request → response",
                "message": "field | type = number",
                "enum": "value | number",
            }[kind]
            lines += [
                f"### {kind} `{name}`",
                "",
                comment,
                "",
                f"| {head} | meaning |",
                "|---|---|---|",
            ]
        if in_section:
            lines += _flush(table)
    return "\n".join(lines) + "\n"


def _flush(table: list[str]) -> list[str]:
    """The rows collected so far (then emptied), or a note that the element has none."""
    rows = table[:] or ["| – | – | – |"]
    table.clear()
    return [*rows, ""]


def reference_pages(proto_root: str | Path = "protos") -> dict[str, str]:
    """The generated pages by their path in the site."""
    return {
        "reference/cli.md": cli_markdown(),
        "reference/configuration.md": settings_markdown(),
        "reference/grpc-api.md": grpc_markdown(proto_root),
    }
