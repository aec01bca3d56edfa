"""Command line: ``elasticzo train`` (flags generated from ``TrainConfig``), ``bench``, ``plan``, ``replay``,
``federated``.

Every user error (bad flag or value, missing data, corrupt checkpoint, divergence) ends with a
one-line message that names the culprit and a non-zero exit status, never a traceback.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import sys

from elasticzo import __version__
from elasticzo import config as config_module
from elasticzo.bench.grid import GRID_DATASETS, GRID_METHODS, PRECISION_CHOICES
from elasticzo.config import TrainConfig

USER_ERRORS = (ValueError, FileNotFoundError, RuntimeError)
DESCRIPTION = ("Memory-efficient on-device training: ElasticZO trains the early layers with zeroth-order "
               "SPSA and the last layers with backprop, in FP32 or integer-only INT8. "
               "Run 'elasticzo COMMAND --help' for the flags of each command.")


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
        kind = config_module.field_kind(f.name)
        if kind is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=f.default, help=text)
            continue
        choices = _choices(f.name)
        parser.add_argument(flag, dest=f.name, type=kind, default=f.default, choices=choices,
                            help=text)


def _choices(name: str):
    return config_module.CHOICES.get(name)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="elasticzo", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"elasticzo {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    train = sub.add_parser("train", help="train a model (BP, vanilla ZO or ElasticZO; fp32 or int8)",
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_config_flags(train)
    add_bench_flags(sub.add_parser("bench", help="train the method grid; measure memory, time per step and "
                                   "the ratios against same-process peers (MeZO, plain PyTorch BP)",
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter))
    add_plan_flags(sub.add_parser("plan", help="measured training memory of every ZO/BP split, and the "
                                  "largest split that fits a memory budget",
                                  formatter_class=argparse.ArgumentDefaultsHelpFormatter))
    replay = sub.add_parser("replay", help="rebuild a run's ZO weights from its seed log (seeds.jsonl) and "
                            "check them against its checkpoint, bit for bit",
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    replay.add_argument("run_dir", metavar="RUN_DIR", help="the run's folder (config.json, seeds.jsonl, checkpoint)")
    replay.add_argument("--out", default=None, help="also write the rebuilt ZO weights to this safetensors file")
    federated = sub.add_parser("federated", help="federated ElasticZO (clients exchange seeds and scalars, "
                               "and the BP tail) on Flower's simulation engine",
                               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_config_flags(federated)
    from elasticzo.federated.cli import add_federated_flags

    add_federated_flags(federated)
    return parser


def add_bench_flags(p: argparse.ArgumentParser) -> None:
    """Flags of ``elasticzo bench`` (validated again by ``bench.grid.BenchConfig``)."""
    p.add_argument("--out", default="bench-results", help="folder for results.json/csv/md, plots and runs/")
    p.add_argument("--quick", action="store_true", help="CI size: 1000 train / 500 test examples, 1 epoch, "
                   "20 timed steps (each size flag below overrides it)")
    p.add_argument("--datasets", nargs="+", default=list(GRID_DATASETS), choices=GRID_DATASETS,
                   help="datasets of the grid")
    methods = tuple(GRID_METHODS)
    p.add_argument("--methods", nargs="+", default=list(methods), choices=methods,
                   help="bp: all layers BP; zo: vanilla ZO; kK: ElasticZO with the last K layers in BP")
    p.add_argument("--precision", default="all", choices=PRECISION_CHOICES,
                   help="all: fp32 rows, and int8 rows when the INT8 learner exists (else a note says why not)")
    p.add_argument("--model", default="lenet5", choices=("lenet5", "mlp"), help="model of every run")
    p.add_argument("--batch-size", type=int, default=64, help="examples per step")
    p.add_argument("--epochs", type=int, default=None, help="default 5 (--quick: 1)")
    p.add_argument("--train-limit", type=int, default=None,
                   help="first N training examples; default all (--quick: 1000)")
    p.add_argument("--test-limit", type=int, default=None, help="first N test examples; default all (--quick: 500)")
    p.add_argument("--timing-steps", type=int, default=None,
                   help="timed steps per method and peer; default 200 (--quick: 20)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps before timing; default 10 (--quick: 3)")
    p.add_argument("--rounds", type=int, default=None, help="the timed steps are interleaved over this many rounds; "
                   "default 20 (--quick: 2)")
    p.add_argument("--measure-only", action="store_true", help="skip the training grid: memory, time and ratios only")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a training setting for every run, e.g. --set lr_zo=3e-4 --set normalize=true")
    p.add_argument("--seed", type=int, default=0, help="seed of every run")
    p.add_argument("--device", default="auto", choices=config_module.DEVICES, help="auto: cuda when available")
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: leave as is)")
    p.add_argument("--data-root", default=None, help="else $ELASTICZO_DATA, else ./data")
    p.add_argument("--download", action=argparse.BooleanOptionalAction, default=True,
                   help="fetch missing dataset files (checksummed)")
    p.add_argument("--plots", action=argparse.BooleanOptionalAction, default=True,
                   help="PNG and SVG plots (matplotlib)")


def add_plan_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="lenet5", choices=("lenet5", "mlp"), help="the model to plan for")
    p.add_argument("--batch-size", type=int, default=64, help="examples per step (memory grows with it)")
    p.add_argument("--precision", default="both", choices=(*config_module.PRECISIONS, "both"),
                   help="fp32, int8 (integer-only ElasticZO-INT8), or both")
    p.add_argument("--budget", default=None, help="memory budget, e.g. 256KiB, 3MB, 1.5MiB or 1000000 (bytes): "
                   "answers (split, micro-batch) per precision and the train command; without it the table is printed")
    p.add_argument("--micro-batch", type=int, default=0, help="the table's chunk size (0: whole batch); "
                   "with --budget the plan chooses it")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a training setting that changes memory, e.g. --set momentum=0")
    p.add_argument("--device", default="cpu", choices=config_module.DEVICES, help="where memory is measured")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in vars(args).items() if k in names}).validate()


def glue_negative_values(argv: list[str]) -> list[str]:
    """``--flag -5MiB`` -> ``--flag=-5MiB``: argparse takes a value that starts with '-' and is not a
    plain number for a flag, and answers "expected one argument"; glued, the value reaches the
    validation that says what is wrong with it."""
    out: list[str] = []
    for token in argv:
        prev = out[-1] if out else ""
        if re.match(r"-[0-9.]", token) and prev.startswith("--") and "=" not in prev:
            out[-1] = f"{prev}={token}"
        else:
            out.append(token)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = glue_negative_values(sys.argv[1:] if argv is None else list(argv))
    args = parser.parse_args(argv)
    try:
        if args.command == "train":
            from elasticzo.train.loop import train

            train(config_from_args(args))
        elif args.command == "bench":
            from elasticzo.bench.grid import bench_config_from_args
            from elasticzo.bench.runner import run_bench

            run_bench(bench_config_from_args(args, argv))
        elif args.command == "plan":
            from elasticzo.bench.plan import plan_main
            from elasticzo.bench.grid import parse_overrides

            return plan_main(args.model, args.batch_size, args.precision, args.budget, args.device,
                             settings=parse_overrides(args.overrides), micro_batch=args.micro_batch)
        elif args.command == "replay":
            from elasticzo.train.replay import replay_main

            return replay_main(args.run_dir, args.out)
        elif args.command == "federated":
            from elasticzo.federated.cli import federated_main

            return federated_main(config_from_args(args), args)
    except KeyboardInterrupt:
        print("elasticzo: interrupted; resume with --resume", file=sys.stderr)
        return 130
    except USER_ERRORS as err:
        print(f"elasticzo: error: {' '.join(str(err).split())}", file=sys.stderr)  # always one line
        return 2 if isinstance(err, ValueError) and not isinstance(err, RuntimeError) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
