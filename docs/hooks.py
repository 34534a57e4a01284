"""MkDocs hooks: the CLI reference and the config reference are written from the code when the site is built, so
they cannot drift from what `cnn --help` and the configs say (mkdocs.yml names this file under `hooks`)."""

from __future__ import annotations

from typing import Any, get_origin

CLI_MARK, CONFIG_MARK = "<!-- cli-reference -->", "<!-- config-reference -->"


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    if CLI_MARK in markdown:
        markdown = markdown.replace(CLI_MARK, cli_reference())
    if CONFIG_MARK in markdown:
        markdown = markdown.replace(CONFIG_MARK, config_reference())
    return markdown


def cli_reference() -> str:
    """Every command of `cnn`, its usage, help and options, as `cnn COMMAND --help` shows them (typer's command
    objects, read by their attributes: typer carries its own copy of click)."""
    from typer.main import get_command

    from flows.cli import app

    root = get_command(app)
    out: list[str] = []
    for name in sorted(root.commands):  # type: ignore[attr-defined]  # a TyperGroup
        command = root.commands[name]  # type: ignore[attr-defined]
        group = getattr(command, "commands", None)  # `cnn tables ...`: a group of commands
        if group:
            for sub in sorted(group):
                out += _command_reference(f"{name} {sub}", group[sub])
        else:
            out += _command_reference(name, command)
    return "\n".join(out)


def _command_reference(name: str, command: Any) -> list[str]:
    arguments = [p for p in command.params if p.param_type_name == "argument"]
    usage = " ".join([f"cnn {name} [OPTIONS]", *(p.name.upper() + ("..." if p.nargs == -1 else "") for p in arguments)])
    out = [f"## `cnn {name}`", "", (command.help or "").strip(), "", f"    {usage}", ""]
    rows = [f"| `{p.name.upper()}` | {_cell(getattr(p, 'help', '') or '')} |" for p in arguments]
    for param in command.params:
        if param.param_type_name == "option":
            flags = ", ".join(f"`{f}`" for f in [*param.opts, *param.secondary_opts])
            rows.append(f"| {flags} | {_cell(param.help or '')} |")
    if rows:
        out += ["| argument or option | meaning |", "|---|---|", *rows, ""]
    return out


def config_reference() -> str:
    """Every field of the flows' configs: its type, default and description (the same text `--help` shows)."""
    from cnn.config import IngestOptions, ScoreConfig, TrainConfig

    out = []
    for model, where in ((IngestOptions, "ingest"), (TrainConfig, "train"), (ScoreConfig, "score")):
        out += [f"## `{model.__name__}` (`cnn {where} --config FILE`)", "", (model.__doc__ or "").strip(), ""]
        out += ["| key | type | default | meaning |", "|---|---|---|---|"]
        for name, info in model.model_fields.items():
            default = "required" if info.is_required() else repr(info.get_default(call_default_factory=True))
            plain = get_origin(info.annotation) is None and hasattr(info.annotation, "__name__")
            kind = info.annotation.__name__ if plain else str(info.annotation).replace("typing.", "")  # type: ignore[union-attr]
            out.append(f"| `{name}` | `{_cell(kind)}` | `{_cell(default)}` | {_cell(info.description or '')} |")
        out.append("")
    return "\n".join(out)


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")
