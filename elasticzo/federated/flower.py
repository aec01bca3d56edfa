"""Federated ElasticZO over Flower: a ClientApp, a custom Strategy, and the simulation engine.

The protocol is ``federated.protocol``; this module only carries its messages in Flower records:

- server -> client: ArrayRecord ``arrays`` {gbar [rounds missed, T, q], tail.i} and ConfigRecord
  ``config`` {round, first};
- client -> server: ArrayRecord ``arrays`` {g [T, q], tail.i} and MetricRecord ``metrics``
  {num-examples, cid}.

A client's state between rounds (its copy of the global ZO weights, how many rounds it has
applied, its position in its data, the running RMS of g) lives in the Flower ``Context.state``
of its node. Bytes are measured on the serialised records (Flower's protobuf, what a deployment
sends) and on the tensor payload alone. Needs ``pip install 'elasticzo[federated]'``.
"""
from __future__ import annotations

import logging
from collections import OrderedDict

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.serde import recorddict_to_proto
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from elasticzo.config import TrainConfig
from elasticzo.federated.protocol import FedClient, FedServer, FedSettings, payload_bytes, zo_part
from elasticzo.federated.simulate import federated_data, initial_record, round_record


def _arrays(named: dict[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord(OrderedDict((k, v.detach().cpu().contiguous()) for k, v in named.items()))


def _tensors(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return dict(record.to_torch_state_dict())


def _tail(named: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    return [named[f"tail.{i}"] for i in range(sum(k.startswith("tail.") for k in named))]


def wire_bytes(content: RecordDict) -> int:
    """Size of the records as Flower serialises them (protobuf)."""
    return recorddict_to_proto(content).ByteSize()


# ---------------------------------------------------------------- client side


def _save_client(client: FedClient, state: RecordDict) -> None:
    zo = zo_part(client.learner)
    named = {f"zo.{i}": t for i, t in enumerate(client.global_zo)}
    if zo is not None:
        named.update({f"opt.{k}": v for k, v in client.learner.optimizer.state[zo["params"][0]].items()})
    state["elasticzo.arrays"] = _arrays(named)
    state["elasticzo.position"] = ConfigRecord({"synced": client.synced, "batches": client.batches})


def _load_client(client: FedClient, state: RecordDict) -> None:
    if "elasticzo.position" not in state:
        return  # first round of this node: the initial weights
    named = _tensors(state["elasticzo.arrays"])
    client.global_zo = [named[f"zo.{i}"] for i in range(len(client.global_zo))]
    zo = zo_part(client.learner)
    if zo is not None:
        client.learner.optimizer.state[zo["params"][0]].update(
            {k[4:]: v.clone() for k, v in named.items() if k.startswith("opt.")})
    client.synced = int(state["elasticzo.position"]["synced"])
    client.batches = int(state["elasticzo.position"]["batches"])


def make_client_app(config: TrainConfig, fed: FedSettings) -> ClientApp:
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        torch.set_num_threads(1)
        cid = int(context.node_config["partition-id"])
        shards, _, num_classes = federated_data(config, fed)
        client = FedClient(config, fed, cid, *shards[cid], num_classes, torch.device("cpu"))
        _load_client(client, context.state)
        named, cfg = _tensors(msg.content["arrays"]), msg.content["config"]
        message = {"round": int(cfg["round"]), "first": int(cfg["first"]), "gbar": named["gbar"], "tail": _tail(named)}
        reply = client.train_round(message)  # ClientDropped: Flower returns an error reply
        _save_client(client, context.state)
        arrays = _arrays({"g": reply["g"], **{f"tail.{i}": t for i, t in enumerate(reply["tail"])}})
        metrics = MetricRecord({"num-examples": reply["n"], "cid": cid})
        return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)

    return app


# ---------------------------------------------------------------- server side


class ElasticZOStrategy(Strategy):
    """Per-node messages (each node gets the rounds it missed), ZO replay and FedAvg of the tail."""

    def __init__(self, config: TrainConfig, fed: FedSettings, log=print):
        shards, (self.x_test, self.y_test), num_classes = federated_data(config, fed)
        self.fed, self.log = fed, log
        self.server = FedServer(config, fed, num_classes, torch.device("cpu"))
        self.records = [initial_record(self.server, self.x_test, self.y_test)]
        self.down: dict[int, int] = {}
        self.payload: dict[int, int] = {}

    def summary(self) -> None:
        logging.getLogger("flwr").info("ElasticZOStrategy: %s", self.fed)

    def configure_train(self, server_round, arrays, config, grid: Grid):
        nodes, _ = sample_nodes(grid, self.fed.clients, self.fed.clients)
        messages, self.down, self.payload = [], {}, {}
        for node in sorted(nodes):
            plain = self.server.message_for(node, server_round - 1)
            named = {"gbar": plain["gbar"], **{f"tail.{i}": t for i, t in enumerate(plain["tail"])}}
            content = RecordDict({"arrays": _arrays(named),
                                  "config": ConfigRecord({"round": plain["round"], "first": plain["first"]})})
            self.down[node], self.payload[node] = wire_bytes(content), payload_bytes(plain)
            messages.append(Message(content, dst_node_id=node, message_type="train"))
        return messages

    def aggregate_train(self, server_round, replies):
        plain, up, dropped = {}, {}, []
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                dropped.append(node)
                continue
            named, metrics = _tensors(msg.content["arrays"]), msg.content["metrics"]
            plain[node] = {"g": named["g"], "tail": _tail(named), "n": int(metrics["num-examples"]),
                           "cid": int(metrics["cid"])}
            up[node] = wire_bytes(msg.content)
        self.server.aggregate(server_round - 1, plain)
        record = round_record(server_round - 1, self.server, self.x_test, self.y_test, self.down, up, dropped)
        record["payload_bytes_down_per_client"] = sum(self.payload.values()) / max(len(self.payload), 1)
        record["payload_bytes_up_per_client"] = sum(payload_bytes(r) for r in plain.values()) / max(len(plain), 1)
        self.records.append(record)
        self.log(str(record))
        return None, MetricRecord({"test_acc": record["test_acc"]})

    def configure_evaluate(self, server_round, arrays, config, grid):
        return []  # the server evaluates the global model itself (round_record)

    def aggregate_evaluate(self, server_round, replies):
        return None


def run_flower(config: TrainConfig, fed: FedSettings, log=print) -> list[dict]:
    """``fed.rounds`` rounds with ``fed.clients`` simulated clients on Flower's simulation engine."""
    from flwr.simulation import run_simulation

    strategy = ElasticZOStrategy(config, fed, log)
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        strategy.start(grid=grid, initial_arrays=ArrayRecord(), num_rounds=fed.rounds)

    run_simulation(server_app=server, client_app=make_client_app(config, fed), num_supernodes=fed.clients,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
    if len(strategy.records) != fed.rounds + 1:
        raise RuntimeError(f"the Flower simulation ended after {len(strategy.records) - 1} of {fed.rounds} rounds; "
                           "see its log above")
    return strategy.records
