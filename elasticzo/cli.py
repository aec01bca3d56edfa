"""Command line: ``elasticzo train`` (flags generated from ``TrainConfig``), ``bench`` and ``plan``.

Every user error (bad flag or value, missing data, corrupt checkpoint, divergence) ends with a
one-line message that names the culprit and a non-zero exit status, never a traceback.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import sys

from elasticzo import config as config_module
from elasticzo.config import TrainConfig

USER_ERRORS = (ValueError, FileNotFoundError, RuntimeError)


def _field_help() -> dict[str, str]:
    """Help text per field, taken from the comment beside it in config.py (one source of truth)."""
    source = inspect.getsource(config_module.TrainConfig)
    return {m.group(1): m.group(2).strip() for m in re.finditer(r"^\s+(\w+):[^#\n]*#(.*)$", source, re.M)}


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field: --name-with-dashes, typed, default shown."""
    helps = _field_help()
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        text = helps.get(f.name, "")
        if f.type in ("bool", bool):
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=f.default, help=text)
            continue
        kind = {"int": int, "float": float}.get(str(f.type), str)
        choices = _choices(f.name)
        parser.add_argument(flag, dest=f.name, type=kind, default=f.default, choices=choices,
                            help=f"{text} (default: {f.default!r})")


def _choices(name: str):
    return {"method": config_module.METHODS, "precision": config_module.PRECISIONS,
            "schedule": config_module.SCHEDULES, "noise": ("gaussian", "rademacher"),
            "bp_grad": ("mean", "plus"), "device": ("auto", "cpu", "cuda")}.get(name)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="elasticzo", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a model (BP, vanilla ZO or ElasticZO; fp32 or int8)",
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_config_flags(train)
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in vars(args).items() if k in names}).validate()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "train":
            from elasticzo.train.loop import train

            train(config_from_args(args))
    except KeyboardInterrupt:
        print("elasticzo: interrupted; resume with --resume", file=sys.stderr)
        return 130
    except USER_ERRORS as err:
        print(f"elasticzo: error: {err}", file=sys.stderr)
        return 2 if isinstance(err, ValueError) and not isinstance(err, RuntimeError) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
