"""``elasticzo federated``: the training flags of ``train`` plus the federation's (from FedSettings)."""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
from pathlib import Path

from elasticzo.federated.protocol import FedSettings
from elasticzo.federated.split import SPLITS

RUNTIMES = ("flower", "inprocess")


def add_federated_flags(p: argparse.ArgumentParser) -> None:
    """One flag per FedSettings field (help from the comment beside it), the runtime and the output."""
    source = inspect.getsource(FedSettings)
    helps = {m.group(1): m.group(2).strip() for m in re.finditer(r"^\s+(\w+):[^#\n]*#(.*)$", source, re.M)}
    for f in dataclasses.fields(FedSettings):
        p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=type(f.default), default=f.default,
                       choices=SPLITS if f.name == "split" else None, help=helps[f.name])
    p.add_argument("--runtime", default="flower", choices=RUNTIMES,
                   help="flower: Flower's simulation engine (pip install 'elasticzo[federated]'); "
                        "inprocess: the same protocol, clients one after another in this process, no Flower")
    p.add_argument("--out", default=None, help="federated.jsonl with one record per round (default: "
                   "runs/federated-<dataset>-<method>[-k<K>]-c<clients>-s<seed>/federated.jsonl)")


def settings_from_args(args: argparse.Namespace) -> FedSettings:
    return FedSettings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(FedSettings)}).validate()


def default_out(config, fed: FedSettings) -> Path:
    split = f"-k{config.bp_layers}" if config.method == "elasticzo" else ""
    return Path(f"runs/federated-{config.dataset}-{config.method}{split}-c{fed.clients}-s{config.seed}/federated.jsonl")


def federated_main(config, args: argparse.Namespace) -> int:
    """Run the federation; write and print one record per round."""
    from elasticzo.federated.simulate import check_settings, run_inprocess, write_records

    fed = settings_from_args(args)
    check_settings(config, fed)
    if args.runtime == "flower":
        try:
            from elasticzo.federated.flower import run_flower
        except ImportError as err:
            raise ValueError(f"--runtime flower needs Flower ({err}); pip install 'elasticzo[federated]' "
                             "or use --runtime inprocess") from None
        records = run_flower(config, fed)
    else:
        records = run_inprocess(config, fed)
    out = Path(args.out) if args.out else default_out(config, fed)
    write_records(records, out)
    print(f"wrote {out}")
    return 0
