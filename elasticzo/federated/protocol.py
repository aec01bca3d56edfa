"""Federated ElasticZO: clients exchange seeds and scalars for the ZO part, weights only for the tail.

Round r of T local steps (step t of round r uses the ZO seeds of global step r T + t, the same
on every client, so every client perturbs along the same directions z_t):

1. The server sends a client the aggregated projected gradients of the rounds it has not yet
   applied (T q floats per round) and the global BP tail.
2. The client replays those rounds on its copy of the global ZO weights (``zo.replay``; no forward
   pass), loads the tail, trains T local ElasticZO steps on its own data and returns its T x q
   projected gradients g_c, its tail and its example count n_c.
3. The server weights the replies by n_c (FedAvg): gbar_t = sum_c w_c g_c,t; it replays
   theta_Z <- theta_Z - lr_t / q sum_j gbar_t,j z_t,j for t < T (lr_t: the run's schedule at global
   step r T + t, a rule both sides know), and sets the tail to sum_c w_c tail_c.

A client that drops out mid-round sends nothing: the round aggregates the others (or changes
nothing when none replied), and the dropped client catches up from the server's history next
time, starting from its last copy of the global weights, never from its half-trained ones.
``bp_layers = all`` (``--method bp``) is plain FedAvg of the whole model, the baseline.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from elasticzo.config import TrainConfig
from elasticzo.data import BatchLoader
from elasticzo.train.learner import Learner
from elasticzo.zo.noise import derive_seed
from elasticzo.zo.replay import replay_zo


class ClientDropped(RuntimeError):
    """A (simulated) client left mid-round; its reply never reaches the server."""


@dataclass
class FedSettings:
    clients: int = 4  # simulated clients
    rounds: int = 10  # federated rounds
    local_steps: int = 20  # local ElasticZO steps per client per round
    split: str = "classes"  # classes | dirichlet | iid
    classes_per_client: int = 2  # --split classes: labels each client holds
    alpha: float = 0.5  # --split dirichlet: concentration (small: more skewed)
    drop_rate: float = 0.0  # probability that a client drops out mid-round (simulated)

    def validate(self) -> "FedSettings":
        for name in ("clients", "rounds", "local_steps"):
            if not getattr(self, name) >= 1:
                raise ValueError(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(self, name)!r}")
        if not 0 <= self.drop_rate < 1:
            raise ValueError(f"--drop-rate: must be in [0, 1), got {self.drop_rate!r}")
        return self


def zo_part(learner: Learner) -> dict | None:
    return next((g for g in learner.optimizer.param_groups if g["part"] == "zo"), None)


def tail_params(learner: Learner) -> list[torch.Tensor]:
    """The BP tail's parameters, over all its parameter groups."""
    return [p for g in learner.optimizer.param_groups if g["part"] == "bp" for p in g["params"]]


def payload_bytes(message: dict) -> int:
    """Bytes of a protocol message: its tensors' data plus 8 per scalar (names not counted)."""
    total = 0
    for value in message.values():
        if isinstance(value, torch.Tensor):
            total += value.numel() * value.element_size()
        elif isinstance(value, (list, tuple)):
            total += sum(v.numel() * v.element_size() for v in value)
        else:
            total += 8
    return total


def replay_round(learner: Learner, round_: int, gbar: torch.Tensor, total_steps: int) -> None:
    """Apply the aggregated ZO update of ``round_`` (gbar [T, q]) to the learner's ZO part."""
    zo = zo_part(learner)
    if zo is None or gbar.numel() == 0:
        return
    steps = gbar.shape[0]
    records, lrs = [], []
    for t in range(steps):
        step = round_ * steps + t
        learner.set_progress(step / total_steps)
        records.append({"step": step, "g": gbar[t].tolist()})
        lrs.append(zo["lr"])
    replay_zo(learner.optimizer, records, lrs)


class FedClient:
    """One client: its data and a learner; ``global_zo`` is its copy of the last global ZO weights."""

    def __init__(self, config: TrainConfig, fed: FedSettings, cid: int, x: torch.Tensor, y: torch.Tensor,
                 num_classes: int, device: torch.device):
        self.config, self.fed, self.cid = config, fed, cid
        self.learner = Learner(config, num_classes, device)  # same seed: the server's initial weights
        self.loader = BatchLoader(x, y, config.batch_size, seed=derive_seed(config.seed, cid, 1, 0))
        self.num_examples = x.shape[0]
        zo = zo_part(self.learner)
        self.global_zo = [] if zo is None else [p.detach().clone() for p in zo["params"]]
        self.synced = 0  # rounds whose aggregate global_zo includes
        self.batches = 0  # batches drawn so far (the position in its own data)
        self.total_steps = fed.rounds * fed.local_steps

    def train_round(self, message: dict) -> dict:
        """Catch up, train ``local_steps`` steps from the global model, reply with g, tail and n."""
        round_ = message["round"]
        self._catch_up(message["first"], message["gbar"])
        for p, value in zip(tail_params(self.learner), message["tail"]):
            p.data.copy_(value)
            self.learner.optimizer.state.pop(p, None)  # local momentum starts afresh each round
        for group in self.learner.optimizer.param_groups:
            if group["part"] == "zo":
                group["step"] = round_ * self.fed.local_steps  # the round's shared seeds
        drop_at = self._drop_step(round_)
        start = self._local_state()
        grads = []
        for t in range(self.fed.local_steps):
            if t == drop_at:
                self._restore_local_state(start)  # what a device that crashed mid-round would still have
                raise ClientDropped(f"client {self.cid} dropped out at local step {t} of round {round_}")
            x, y = self._next_batch()
            self.learner.set_progress((round_ * self.fed.local_steps + t) / self.total_steps)
            self.learner.train_step(x, y)
            record = self.learner.step_record()
            grads.append(torch.zeros(0) if record is None else record.detach().float().cpu())
        return {"g": torch.stack(grads), "tail": [p.detach().clone() for p in tail_params(self.learner)],
                "n": self.num_examples, "cid": self.cid}

    def _catch_up(self, first: int, gbar: torch.Tensor) -> None:
        """global_zo <- the global ZO weights after every round sent; the learner starts from them."""
        zo = zo_part(self.learner)
        if zo is None:
            return
        for p, saved in zip(zo["params"], self.global_zo):
            p.data.copy_(saved)
        for offset, round_gbar in enumerate(gbar):
            if first + offset >= self.synced:  # a round it applied already (its reply got lost) is skipped
                replay_round(self.learner, first + offset, round_gbar, self.total_steps)
        self.synced = max(self.synced, first + gbar.shape[0])
        self.global_zo = [p.detach().clone() for p in zo["params"]]

    def _local_state(self) -> tuple[int, dict]:
        zo = zo_part(self.learner)
        rms = {} if zo is None else self.learner.optimizer.state[zo["params"][0]]
        return self.batches, {k: v.clone() for k, v in rms.items()}

    def _restore_local_state(self, saved: tuple[int, dict]) -> None:
        self.batches = saved[0]
        zo = zo_part(self.learner)
        if zo is not None:
            self.learner.optimizer.state[zo["params"][0]] = dict(saved[1])

    def _drop_step(self, round_: int) -> int | None:
        """The local step at which this client drops out of ``round_`` (None: it stays)."""
        if not self.fed.drop_rate:
            return None
        u = derive_seed(self.config.seed, round_, self.cid, 7) / 2.0 ** 63
        return self.fed.local_steps // 2 if u < self.fed.drop_rate else None

    def _next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, step = divmod(self.batches, len(self.loader))
        self.batches += 1
        return next(iter(self.loader.epoch_batches(epoch, step)))


class FedServer:
    """The global model, the history of aggregated ZO rounds and what each client has applied."""

    def __init__(self, config: TrainConfig, fed: FedSettings, num_classes: int, device: torch.device):
        self.config, self.fed = config, fed
        self.learner = Learner(config, num_classes, device)
        self.history: list[torch.Tensor] = []  # gbar [T, q] of each round
        self.synced: dict[int, int] = {}  # client -> rounds it has applied (as far as the server knows)
        self.total_steps = fed.rounds * fed.local_steps

    def message_for(self, cid: int, round_: int) -> dict:
        """What client ``cid`` needs for ``round_``: the rounds it missed and the global tail."""
        first = min(self.synced.get(cid, 0), round_)
        missed = self.history[first:round_]
        gbar = torch.stack(missed) if missed else torch.zeros(0, self.fed.local_steps, self._queries())
        return {"round": round_, "first": first, "gbar": gbar,
                "tail": [p.detach().clone() for p in tail_params(self.learner)]}

    def aggregate(self, round_: int, replies: dict[int, dict]) -> None:
        """FedAvg-weight the replies of ``round_`` (node -> reply); none replied: nothing changes.
        Nodes are whatever the runtime calls them (client index in process, node id in Flower)."""
        if replies:
            ordered = sorted(replies.values(), key=lambda r: r["cid"])  # one summation order on every runtime
            total = sum(r["n"] for r in ordered)
            gbar = sum((r["n"] / total) * r["g"].double() for r in ordered).float()
            tails = zip(*[[w * (r["n"] / total) for w in r["tail"]] for r in ordered])
            for p, parts in zip(tail_params(self.learner), tails):
                p.data.copy_(torch.stack(parts).sum(0))
        else:
            gbar = torch.zeros(self.fed.local_steps, self._queries())
        replay_round(self.learner, round_, gbar, self.total_steps)
        self.history.append(gbar)
        for cid in replies:
            self.synced[cid] = round_

    def _queries(self) -> int:
        zo = zo_part(self.learner)
        return 0 if zo is None else zo["queries"]
