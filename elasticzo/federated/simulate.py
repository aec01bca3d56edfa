"""Federated runs: the shared data set-up, the per-round record, and an in-process driver.

``elasticzo federated`` runs the protocol over Flower (``federated.flower``); ``run_inprocess``
drives the same ``FedClient`` / ``FedServer`` objects in one process, without Flower, for the
tests and for users without the ``federated`` extra. Both count the bytes of every message.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import torch

from elasticzo.config import TrainConfig
from elasticzo.data import load_dataset
from elasticzo.federated.protocol import ClientDropped, FedClient, FedServer, FedSettings, payload_bytes
from elasticzo.federated.split import split_indices
from elasticzo.train.loop import evaluate


def check_settings(config: TrainConfig, fed: FedSettings) -> None:
    config.validate()
    fed.validate()
    if config.precision != "fp32":
        raise ValueError("federated: --precision int8 is not supported yet (FP32 ElasticZO, vanilla ZO and BP are)")
    if config.model == "pointnet":
        raise ValueError("federated: --model pointnet is not supported yet; use lenet5 or mlp")


@lru_cache(maxsize=4)
def _splits(config_json: str, fed_json: str):
    config, fed = TrainConfig(**json.loads(config_json)), FedSettings(**json.loads(fed_json))
    parts = {}
    for split, limit in (("train", config.train_limit), ("test", config.test_limit)):
        parts[split] = load_dataset(config.dataset, config.data_root, split, config.download, limit or None,
                                    classes=config.classes)
    train = parts["train"]
    shards = split_indices(train.y, fed.clients, fed.split, config.seed, fed.classes_per_client, fed.alpha)
    clients = [(train.x[idx], train.y[idx]) for idx in shards]
    return clients, (parts["test"].x, parts["test"].y), train.num_classes


def federated_data(config: TrainConfig, fed: FedSettings):
    """([(x, y) per client], (x_test, y_test), num_classes); cached per process (Flower reuses workers)."""
    return _splits(json.dumps(config.to_dict(), sort_keys=True), json.dumps(fed.__dict__, sort_keys=True))


def round_record(round_: int, server: FedServer, x_test, y_test, down: dict, up: dict, dropped: list) -> dict:
    """One line of federated.jsonl: accuracy of the global model and the bytes of the round."""
    return {"round": round_ + 1, "test_acc": evaluate(server.learner, x_test, y_test),
            "clients": len(down), "replies": len(up), "dropped": sorted(dropped),
            "bytes_down_per_client": sum(down.values()) / max(len(down), 1),
            "bytes_up_per_client": sum(up.values()) / max(len(up), 1)}


def initial_record(server: FedServer, x_test, y_test) -> dict:
    """Round 0: the accuracy of the initial global model, before any message."""
    return {"round": 0, "test_acc": evaluate(server.learner, x_test, y_test)}


def run_inprocess(config: TrainConfig, fed: FedSettings, log=print) -> list[dict]:
    """All rounds in this process, clients one after another; returns the per-round records."""
    check_settings(config, fed)
    device = torch.device("cpu")
    shards, (x_test, y_test), num_classes = federated_data(config, fed)
    server = FedServer(config, fed, num_classes, device)
    clients = [FedClient(config, fed, cid, x, y, num_classes, device) for cid, (x, y) in enumerate(shards)]
    records = [initial_record(server, x_test, y_test)]
    for round_ in range(fed.rounds):
        replies, down, up, dropped = {}, {}, {}, []
        for client in clients:
            message = server.message_for(client.cid, round_)
            down[client.cid] = payload_bytes(message)
            try:
                replies[client.cid] = client.train_round(message)
            except ClientDropped:
                dropped.append(client.cid)
                continue
            up[client.cid] = payload_bytes(replies[client.cid])
        server.aggregate(round_, replies)
        records.append(round_record(round_, server, x_test, y_test, down, up, dropped))
        log(json.dumps(records[-1]))
    return records


def write_records(records: list[dict], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in records))
