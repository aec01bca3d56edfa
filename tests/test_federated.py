"""Federated ElasticZO: splits, the protocol's exactness, dropouts, bytes, and the Flower runtime.

The protocol tests drive ``FedClient`` / ``FedServer`` in one process (no Flower needed); the
Flower test (the same protocol carried by Flower's simulation engine, which must give the same
global model) needs the ``federated`` extra and about 3 minutes, so it is marked slow.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from elasticzo.config import TrainConfig
from elasticzo.federated.protocol import FedClient, FedServer, FedSettings, tail_params, zo_part
from elasticzo.federated.simulate import federated_data, run_inprocess
from elasticzo.federated.split import class_split, dirichlet_split, iid_split

pytestmark = pytest.mark.usefixtures("one_thread")

labels_strategy = st.lists(st.integers(0, 9), min_size=12, max_size=300).map(torch.tensor)


def _is_partition(parts: list[torch.Tensor], n: int) -> bool:
    every = torch.cat(parts).sort().values
    return torch.equal(every, torch.arange(n))


@given(labels=labels_strategy, clients=st.integers(1, 6), seed=st.integers(0, 2**31))
@settings(max_examples=40, deadline=None)
def test_iid_and_dirichlet_splits_partition_the_data(labels, clients, seed):
    assert _is_partition(iid_split(labels, clients, seed), labels.numel())
    try:
        parts = dirichlet_split(labels, clients, alpha=1.0, seed=seed)
    except ValueError as err:  # allowed only with its message
        assert "left a client without data" in str(err)
        return
    assert _is_partition(parts, labels.numel()) and all(p.numel() > 0 for p in parts)


@given(labels=labels_strategy, clients=st.integers(1, 6), m=st.integers(1, 3), seed=st.integers(0, 2**31))
@settings(max_examples=40, deadline=None)
def test_class_split_gives_each_client_at_most_m_classes(labels, clients, m, seed):
    m = min(m, int(labels.max()) + 1)
    parts = class_split(labels, clients, m, seed)
    every = torch.cat(parts)
    assert every.unique().numel() == every.numel()  # disjoint
    assert all(labels[p].unique().numel() <= m for p in parts)
    held = {k for p in parts for k in labels[p].tolist()}
    assert every.numel() == sum(int((labels == k).sum()) for k in held)  # a held class is shared out whole


def test_bad_split_settings_name_the_value():
    with pytest.raises(ValueError, match="--classes-per-client"):
        class_split(torch.arange(10), 2, 11, 0)
    with pytest.raises(ValueError, match="--alpha"):
        dirichlet_split(torch.arange(10), 2, 0.0, 0)
    with pytest.raises(ValueError, match="--drop-rate"):
        FedSettings(drop_rate=1.0).validate()


def _config(data_root, **changes) -> TrainConfig:
    settings_ = dict(data_root=str(data_root), train_limit=800, test_limit=300, bp_layers=2, download=False,
                     progress=False, batch_size=32)
    settings_.update(changes)
    if settings_.get("method") == "bp":
        del settings_["bp_layers"]  # every layer is BP; a split would be refused
    return TrainConfig(**settings_)


def _zo_weights(learner) -> list[torch.Tensor]:
    zo = zo_part(learner)
    return [p.detach().clone() for p in zo["params"]]


def test_one_client_federation_is_its_own_training_bit_for_bit(data_root):
    """One client, weight 1: replaying its scalars on the server gives exactly its weights."""
    config, fed = _config(data_root), FedSettings(clients=1, rounds=3, local_steps=3, split="iid")
    shards, _, classes = federated_data(config, fed)
    server = FedServer(config, fed, classes, torch.device("cpu"))
    client = FedClient(config, fed, 0, *shards[0], classes, torch.device("cpu"))
    for round_ in range(fed.rounds):
        server.aggregate(round_, {0: client.train_round(server.message_for(0, round_))})
        assert all(torch.equal(a, b) for a, b in zip(_zo_weights(server.learner), _zo_weights(client.learner)))
        assert all(torch.equal(a, b) for a, b in zip(tail_params(server.learner), tail_params(client.learner)))


def test_dropped_client_catches_up_to_the_global_model(data_root):
    """With seed 0 and drop rate 0.5, client 3 drops out of round 0 half-way; in round 1 it starts
    from the server's global ZO weights exactly (not its half-trained ones), and round 0
    aggregated the others only."""
    config, fed = _config(data_root), FedSettings(clients=4, rounds=2, local_steps=4, drop_rate=0.5)
    shards, _, classes = federated_data(config, fed)
    server = FedServer(config, fed, classes, torch.device("cpu"))
    clients = [FedClient(config, fed, c, *shards[c], classes, torch.device("cpu")) for c in range(4)]
    drops = [[c._drop_step(r) is not None for c in clients] for r in range(2)]
    assert any(drops[0]) and not all(drops[0]), f"pick another seed: drops {drops}"
    replies = {}
    for c in clients:
        try:
            replies[c.cid] = c.train_round(server.message_for(c.cid, 0))
        except RuntimeError as err:
            assert "dropped out at local step 2 of round 0" in str(err)
    assert sorted(replies) == [c.cid for c, d in zip(clients, drops[0]) if not d]
    server.aggregate(0, replies)
    assert all(torch.isfinite(w).all() for w in _zo_weights(server.learner))
    dropped = clients[drops[0].index(True)]
    dropped._catch_up(**{k: v for k, v in server.message_for(dropped.cid, 1).items() if k in ("first", "gbar")})
    assert all(torch.equal(a, b) for a, b in zip(dropped.global_zo, _zo_weights(server.learner)))


def test_four_clients_improve_the_global_model_with_few_bytes(data_root):
    config = _config(data_root, lr_bp=0.1)
    fed = FedSettings(clients=4, rounds=3, local_steps=8, classes_per_client=5)
    records = run_inprocess(config, fed, log=lambda *a: None)
    assert [r["round"] for r in records] == [0, 1, 2, 3]
    assert records[-1]["test_acc"] > records[0]["test_acc"] + 10  # measured: 11.3 % -> 30.0 %
    tail = 4 * sum(p.numel() for p in tail_params(FedServer(config, fed, 10, torch.device("cpu")).learner))
    for r in records[1:]:
        assert r["bytes_up_per_client"] == 4 * fed.local_steps + tail + 16  # T g's, the tail, n and cid
    assert records[2]["bytes_down_per_client"] == 4 * fed.local_steps + tail + 16  # one round's gbar
    fedavg = run_inprocess(_config(data_root, method="bp"), FedSettings(clients=4, rounds=1, local_steps=1),
                           log=lambda *a: None)
    assert fedavg[1]["bytes_up_per_client"] > 5 * records[1]["bytes_up_per_client"]


@pytest.mark.slow
def test_flower_simulation_gives_the_inprocess_global_model(data_root):
    pytest.importorskip("flwr")
    pytest.importorskip("ray")
    from elasticzo.federated.flower import run_flower

    config, fed = _config(data_root), FedSettings(clients=4, rounds=2, local_steps=4, drop_rate=0.3)
    flower = run_flower(config, fed, log=lambda *a: None)
    local = run_inprocess(config, fed, log=lambda *a: None)
    assert [r["test_acc"] for r in flower] == [r["test_acc"] for r in local]
    for f, l in zip(flower[1:], local[1:]):
        assert f["replies"] == l["replies"] and f["payload_bytes_up_per_client"] == l["bytes_up_per_client"]
        assert f["bytes_up_per_client"] > f["payload_bytes_up_per_client"]  # protobuf framing on top
