"""`serve` commands generated from a daemon's configuration dataclass.

Each configuration field is declared once, in the dataclass (coordinator/config.py, agent/config.py):
its name, type, default, validation, and (through `stanchion.settings.option`) its help. The flag
(``--field-name``), the environment variable (``STANCHION_FIELD_NAME``) and the TOML key
(``field_name``) all come from the name. A list field (``tuple[str, ...]``) is a repeatable flag,
named by its ``flag`` metadata when the plural field name reads badly (``entrypoints`` is
``--entrypoint A --entrypoint B``); its environment variable and TOML key hold a list. This module
turns those declarations into Typer options.
Hand-written rather than a library (tyro, pydantic-settings) because the layering, the validation
and the error messages already live in `stanchion.settings`, which the trainer shares: a library
would bring a second loader with different rules.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from stanchion import settings

EPILOG = (
    "Config: defaults < --config TOML < STANCHION_* environment < flags; every option is also a TOML "
    "key (its name with underscores) and an environment variable (shown in its help). "
    "Exit codes: 0 stopped cleanly, 2 bad config, 5 a port already in use."
)


def flag_of(f: dataclasses.Field[Any]) -> str:
    """The command-line flag of a configuration field."""
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _is_list(tp: Any) -> bool:
    return typing.get_origin(tp) in (tuple, list)


def _option(f: dataclasses.Field[Any], tp: Any) -> inspect.Parameter:
    flag = flag_of(f)
    env = settings.ENV_PREFIX + f.name.upper()
    if tp is bool:  # an on-switch, off by default: --insecure, --spare
        info = typer.Option(flag, help=f"{f.metadata['help']} [env {env}=true]")
    elif _is_list(tp):  # a repeatable flag; each use adds one item
        (item,) = {a for a in typing.get_args(tp) if a is not Ellipsis}
        tp = list[item]  # type: ignore[valid-type]
        info = typer.Option(
            flag,
            metavar=f.metadata.get("metavar"),
            help=f"{f.metadata['help']} [env {env} as a TOML list; TOML key {f.name} = [...]]",
        )
    else:
        default = f.default if f.default != "" else '""'
        info = typer.Option(flag, help=f"{f.metadata['help']} [default: {default}; env {env}]")
    return inspect.Parameter(
        f.name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[tp | None, info]
    )


def serve_command(cls: type, run: Callable[[Any, str], None], doc: str) -> Callable[..., None]:
    """A Typer command function whose options are the fields of ``cls`` declared with help, plus
    ``--config`` and ``--port-file``; it loads the configuration and calls ``run(cfg, port_file)``."""
    hints = typing.get_type_hints(cls)
    params = [_option(f, hints[f.name]) for f in dataclasses.fields(cls) if "help" in f.metadata]
    fixed = [
        inspect.Parameter(
            "config",
            inspect.Parameter.KEYWORD_ONLY,
            default=None,
            annotation=Annotated[
                Path | None, typer.Option("--config", help=f"TOML file of {cls.__name__} settings.")
            ],
        ),
        inspect.Parameter(
            "port_file",
            inspect.Parameter.KEYWORD_ONLY,
            default="",
            annotation=Annotated[
                str,
                typer.Option("--port-file", help="Write the bound ports here as JSON (scripts and tests)."),
            ],
        ),
    ]

    def command(**kw: Any) -> None:
        config, port_file = kw.pop("config"), kw.pop("port_file")
        # A repeatable flag never given arrives as an empty list: it must not hide the file's list.
        given = {k: v for k, v in kw.items() if v is not None and v != []}
        cfg = settings.load(cls, toml_path=config, env=os.environ, overrides=given)
        run(cfg, port_file)

    command.__signature__ = inspect.Signature(params + fixed)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params + fixed}
    command.__doc__ = doc
    command.__name__ = "serve"
    return command
