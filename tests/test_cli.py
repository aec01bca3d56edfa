"""The command line as a newcomer meets it: help text, choices, --version, values that start with '-'."""
from __future__ import annotations

import argparse
import importlib.metadata

import pytest

from elasticzo import config
from elasticzo.cli import build_parser, glue_negative_values, main
from elasticzo.data import DATASET_NAMES
from elasticzo.models import MODELS


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


@pytest.mark.parametrize("command", ["train", "bench", "plan", "replay", "federated"])
def test_every_flag_has_help_and_shows_its_default(command):
    parser = _subparsers()[command]
    for action in parser._actions:
        if action.dest == "help":
            continue
        assert action.help and action.help.strip(), f"{command} {action.option_strings} has no help"
    text = parser.format_help()
    assert "(default:" in text


def test_train_help_names_the_defaults_that_were_missing():
    text = " ".join(_subparsers()["train"].format_help().split())  # unwrapped
    for flag, default in [("--epochs", 5), ("--batch-size", 64), ("--lr-bp", 0.05), ("--momentum", 0.9),
                          ("--weight-decay", 0.0), ("--zo-weight-decay", 0.0), ("--seed", 0)]:
        after = text.split(f"{flag} {flag.lstrip('-').replace('-', '_').upper()} ", 1)[1]
        assert f"(default: {default})" in after.split(" --", 1)[0], flag


def test_model_and_dataset_are_choices(capsys):
    assert config.MODEL_NAMES == tuple(MODELS) and config.DATASET_NAMES == tuple(DATASET_NAMES)
    for flag, bad in (("--model", "resnet"), ("--dataset", "cifar10")):
        with pytest.raises(SystemExit) as info:
            main(["train", flag, bad])
        assert info.value.code == 2
        assert "invalid choice" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--model"):
        config.TrainConfig(model="resnet").validate()


def test_description_is_plain_text_and_version_is_the_package_version(capsys):
    assert "``" not in build_parser().format_help()
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"elasticzo {importlib.metadata.version('elasticzo')}"


def test_values_starting_with_a_minus_reach_validation(capsys):
    assert main(["plan", "--budget", "-5MiB"]) == 2
    assert "--budget: '-5MiB' must be more than 0 bytes" in capsys.readouterr().err
    assert main(["train", "--lr-zo", "-1e-3", "--no-download", "--data-root", "/nonexistent"]) == 2
    assert "--lr-zo: must be >= 0, got -0.001" in capsys.readouterr().err
    assert glue_negative_values(["--budget", "-5MiB", "--quick", "-x"]) == ["--budget=-5MiB", "--quick", "-x"]


def test_train_has_a_threads_flag():
    args = build_parser().parse_args(["train", "--threads", "3"])
    assert args.threads == 3
    assert "--threads THREADS" in _subparsers()["train"].format_help()
