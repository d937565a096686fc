"""The ``dpok`` command line: one subcommand per job, options generated from the typed configs."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from collections.abc import Sequence
from typing import Any


def add_dataclass_options(parser: argparse.ArgumentParser, cls: type, skip: Sequence[str] = ()) -> None:
    """One ``--kebab-case`` option per dataclass field; help text from ``field(metadata={"help"})``."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        kind = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        if kind is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                                help=f"{help_text} (default: {default})")
        else:
            conv = kind if kind in (int, float, str) else str
            parser.add_argument(flag, dest=f.name, type=conv, default=None, help=f"{help_text} (default: {default!r})")


def overrides(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The options the user actually gave (not None)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in vars(args).items() if k in names and v is not None}


def _cmd_pretrain(args: argparse.Namespace, argv: list[str]) -> int:
    from .embedded.pretrain import PretrainConfig, run_pretrain, tiny_config

    base = tiny_config(args.work_dir or "pretrain_work") if args.preset == "tiny" else PretrainConfig()
    cfg = dataclasses.replace(base, **overrides(args, PretrainConfig))
    return run_pretrain(cfg, argv)


def build_parser() -> argparse.ArgumentParser:
    from .embedded.pretrain import PretrainConfig

    parser = argparse.ArgumentParser(prog="dpok", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pretrain", help="train the embedded ShapeWorld model and alignment reward from scratch",
                       description="Train the embedded ShapeWorld text-to-image model (tokenizer, text encoder, "
                                   "VAE, UNet) and the shapeworld-alignment reward. Resumes from --work-dir.")
    p.add_argument("--preset", choices=["full", "tiny"], default="full",
                   help="'full' made the shipped model; 'tiny' runs a few steps of everything (for tests)")
    add_dataclass_options(p, PretrainConfig)
    p.set_defaults(func=_cmd_pretrain)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args, argv))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"dpok {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
