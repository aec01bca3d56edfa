"""ElasticZO: zeroth-order SPSA for the early layers, backprop (any torch.optim) for the last layers.

One step on a mini-batch, for each query j = 1..q (seeds are a pure function of
(seed, step, j, layer), so the run can be replayed from its seed log):

    L+_j = loss(theta_Z + eps z_j, theta_B)    backward through the BP layers only -> grad+
    L-_j = loss(theta_Z - eps z_j, theta_B)    backward through the BP layers only -> grad-
    g_j  = clip((L+_j - L-_j) / (2 eps))        the projected gradient (/ its running RMS if normalize)
    theta_Z <- theta_Z (1 - lr_zo wd_zo) - sum_j (g_j lr_zo / q) z_j      (per param group)
    theta_B <- bp_optimizer step on the mean of the 2q BP gradients      (SGD by default)

theta_Z is never written during the perturbed passes (see ``zo.perturb``), so after a step it is
bit-exactly the update rule applied to the old value. ZO parameters have ``requires_grad=False``:
the ZO part builds no autograd graph and stores no activations. ``bp_layers=0`` is vanilla ZO
(MeZO without the in-place drift); all layers in BP is exactly the BP optimiser (``torch.optim.SGD``).
The + and - passes of a query see the same dropout masks, and BatchNorm statistics update once
per step (``optim.closure``). The split follows the forward order (``optim.split``).

Example::

    opt = ElasticZO.for_model(model, bp_layers=2, example_input=x[:1])
    print(opt.describe_split())
    loss = opt.step(lambda: F.cross_entropy(model(x), y))   # the optimiser backpropagates the BP part
"""
from __future__ import annotations

import functools
import math
import warnings
from contextlib import nullcontext
from typing import Callable, Iterable

import torch
from torch import nn
from torch.optim import optimizer as torch_optimizer

from elasticzo.config import BP_GRADS, NOISE_KINDS, TrainConfig
from elasticzo.instrument import phase
from elasticzo.optim.closure import (DROPOUT_STREAM, collect_pass, frozen_statistics, pass_caller, pass_rng,
                                     statistic_modules)
from elasticzo.optim.split import BPSpec, Split, Unit, check_order, describe, run_order, split_model
from elasticzo.zo.noise import derive_seeds
from elasticzo.zo.perturb import hooked_index, perturbed

RMS_DECAY = 0.99
LOW_PRECISION = (torch.float16, torch.bfloat16)  # ZO parameters of these dtypes get a float32 master copy
NONFINITE = ("raise", "ignore")
_CLI = TrainConfig()  # one set of defaults for Python and the CLI


class NonFiniteLoss(FloatingPointError):
    """A pass of the step gave a NaN or infinite loss; no parameter was updated."""


def _check(name: str, value, ok: bool, rule: str) -> None:
    if not ok:
        raise ValueError(f"invalid {name}={value!r}: must be {rule}")


def zo_decay_factor(lr: float, weight_decay: float) -> float:
    """Decoupled weight decay of the ZO part: theta <- theta * (1 - lr * wd) before the step, so
    the decay shrinks with the learning rate (and with its schedule)."""
    return 1 - lr * weight_decay


class ElasticZO(torch.optim.Optimizer):
    """Hybrid ZO/BP optimiser over a model's parameters, split into a ZO part and a BP part.

    Args:
        params: parameters or param groups, as for any ``torch.optim`` optimiser (parameters of
            ``model`` left out are not trained). A group may set ``lr_zo`` and ``lr_bp`` (or ``lr``,
            used for whichever part its parameters are in) and any option of the BP optimiser.
        model: the module the parameters belong to (the ZO part perturbs through its modules).
        bp_layers: the last k layers in forward order train with BP (0: vanilla ZO); or
        bp: the BP part named explicitly: modules, parameter or module names, or a predicate
            ``(name, parameter) -> bool`` (see ``optim.split``).
        example_input: a sample batch; the split is traced from a forward pass on it. Without it
            the split is in registration order, checked against the forward at the first step.
        bp_optimizer: ``callable(param_groups) -> torch.optim.Optimizer`` for the BP part, e.g.
            ``torch.optim.AdamW`` or ``lambda groups: torch.optim.Adam(groups, lr=1e-3)`` (its own
            lr applies unless a group sets ``lr_bp``); default ``SGD(lr_bp, momentum, dampening,
            weight_decay, nesterov)``.
        lr_zo, lr_bp: learning rates of the two parts (lr_zo default: 3e-4 for vanilla ZO, 1e-3
            with a BP part, as in the CLI).
        eps, queries, noise: SPSA perturbation scale, directions per step, ``gaussian``/``rademacher``.
        grad_clip: bound on |g| of each projected gradient (``None``: unbounded).
        normalize: divide each g by the running RMS of past g (decay 0.99, bias-corrected), so the
            ZO step has a fixed size in parameter space whatever the scale of the loss.
        zo_weight_decay: decoupled weight decay on the ZO part.
        bp_grad: ``"mean"`` averages the BP gradients of the + and - passes, ``"plus"`` keeps the + passes.
        nonfinite: ``"raise"``: a NaN/inf loss raises ``NonFiniteLoss`` before any update (one host
            sync per step); ``"ignore"``: no sync, a non-finite g counts as 0 (no ZO update).
        seed: run seed; the directions of step t, query j, layer i come from ``derive_seed(seed, t, j, i)``.
    """

    def __init__(self, params: Iterable, model: nn.Module | None = None, *, bp_layers: int | None = None,
                 bp: BPSpec | None = None, example_input=None, bp_optimizer: Callable | None = None,
                 lr_zo: float | None = None, lr_bp: float = _CLI.lr_bp, eps: float = _CLI.eps,
                 queries: int = _CLI.queries, noise: str = _CLI.noise, grad_clip: float | None = _CLI.grad_clip,
                 normalize: bool = _CLI.normalize, zo_weight_decay: float = _CLI.zo_weight_decay,
                 momentum: float = _CLI.momentum, weight_decay: float = _CLI.weight_decay, dampening: float = 0.0,
                 nesterov: bool = False, bp_grad: str = _CLI.bp_grad, nonfinite: str = "raise", seed: int = _CLI.seed):
        if model is None:
            raise ValueError("ElasticZO needs model=<the nn.Module the parameters belong to>: the ZO part perturbs "
                             "through its modules (or use ElasticZO.for_model(model, bp_layers))")
        _check("lr_zo", lr_zo, lr_zo is None or lr_zo >= 0, ">= 0")
        _check("lr_bp", lr_bp, lr_bp >= 0, ">= 0")
        _check("eps", eps, eps > 0 and math.isfinite(eps), "a finite number > 0")
        _check("queries", queries, isinstance(queries, int) and queries >= 1, "an integer >= 1")
        _check("noise", noise, noise in NOISE_KINDS, f"one of {NOISE_KINDS}")
        _check("grad_clip", grad_clip, grad_clip is None or grad_clip > 0, "> 0 or None")
        _check("zo_weight_decay", zo_weight_decay, zo_weight_decay >= 0, ">= 0")
        _check("momentum", momentum, 0 <= momentum < 1, "in [0, 1)")
        _check("weight_decay", weight_decay, weight_decay >= 0, ">= 0")
        _check("bp_grad", bp_grad, bp_grad in BP_GRADS, f"one of {BP_GRADS}")
        _check("nonfinite", nonfinite, nonfinite in NONFINITE, f"one of {NONFINITE}")
        _check("nesterov", nesterov, not nesterov or (momentum > 0 and dampening == 0),
               "False unless momentum > 0 and dampening == 0")
        self.model, self.nonfinite = model, nonfinite
        self.split: Split = split_model(model, bp_layers, bp, example_input)
        self._order_checked = self.split.traced
        groups = _as_groups(params)
        self._keep_only({id(p) for g in groups for p in g["params"]})
        zo_ids = {id(p) for u in self.split.zo for p in u.params()}
        bp_ids = {id(p) for u in self.split.bp for p in u.params()}
        if lr_zo is None:
            lr_zo = _CLI.zo_learning_rate() if bp_ids else TrainConfig(method="zo").zo_learning_rate()
        zo_opts = dict(eps=eps, queries=queries, noise=noise, grad_clip=grad_clip, normalize=normalize,
                       weight_decay=zo_weight_decay, seed=seed, bp_grad=bp_grad, step=0)
        zo_groups, bp_groups = _partition(groups, zo_ids, bp_ids, lr_zo, zo_opts)
        if not zo_groups and not bp_groups:
            raise ValueError("ElasticZO got no parameters: both the ZO and the BP part are empty")
        if bp_optimizer is None:
            bp_optimizer = lambda groups: torch.optim.SGD(groups, lr=lr_bp, momentum=momentum, dampening=dampening,
                                                          weight_decay=weight_decay, nesterov=nesterov)
        self.bp_optimizer = bp_optimizer(bp_groups) if bp_groups else None
        defaults = dict(self.bp_optimizer.defaults) if self.bp_optimizer else {}
        if "betas" not in defaults:
            defaults.setdefault("momentum", momentum)  # what schedulers that cycle momentum (OneCycleLR) look for
        super().__init__(zo_groups + bp_groups, defaults=defaults)
        self._link_bp_optimizer()
        self._freeze(model, zo_ids, bp_ids)
        self.zo_layers = self.split.zo  # units: a module and the parameters its forward reads
        self._zo_index: dict | None = None  # perturb.hooked_index(zo_layers), built at the first step
        self._zo_group_of = {id(p): g for g in self.param_groups if g["part"] == "zo" for p in g["params"]}
        for p in self._low_precision_zo():
            self.state[p]["master"] = p.detach().float()  # the ZO update accumulates here: steps below bf16's resolution add up
        self._has_masters = bool(self._low_precision_zo())
        self._warned_loss_dtype = False
        self._stats = statistic_modules(model)
        self._rng_devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
        self.last_projected_grads: torch.Tensor | None = None  # [q] of the last step, on device
        # reduce(losses [2q], grads, bp_params) -> (losses, grads): combines the passes of
        # data-parallel replicas in one collective (train.distributed); None in a single process.
        self.reduce: Callable | None = None

    @classmethod
    def for_model(cls, model: nn.Module, bp_layers: int | None = None, **options) -> "ElasticZO":
        """The optimiser for all of ``model``'s parameters with its last ``bp_layers`` layers in BP
        (or ``bp=`` naming the BP part); pass ``example_input=`` to trace the forward order."""
        if bp_layers is None and options.get("bp") is None:
            raise ValueError("ElasticZO.for_model: give bp_layers=k (the last k layers train with BP) or bp=...")
        return cls(model.parameters(), model, bp_layers=bp_layers, **options)

    def _keep_only(self, given: set[int]) -> None:
        """Parameters of the model not given to the optimiser are in neither part."""
        for part in ("zo", "bp"):
            units = [Unit(u.name, u.module, [e for e, p in zip(u.entries, u.params()) if id(p) in given])
                     for u in getattr(self.split, part)]
            setattr(self.split, part, [u for u in units if u.entries])
        names = {id(p): n for n, p in self.model.named_parameters()}
        self.split.unused += [n for i, n in names.items() if i not in given and n not in self.split.unused]

    def describe_split(self) -> str:
        """The ZO and BP parts: modules, parameter counts and memory."""
        state = 2 if self.bp_optimizer is not None and "betas" in self.bp_optimizer.defaults else \
            int(bool(self.bp_optimizer and self.bp_optimizer.defaults.get("momentum")))
        return describe(self.model, self.split, state)

    def _link_bp_optimizer(self) -> None:
        """The BP optimiser shares this optimiser's state and group dicts, so that state_dict,
        schedulers and checkpoints see one optimiser."""
        if self.bp_optimizer is not None:
            self.bp_optimizer.state = self.state
            self.bp_optimizer.param_groups = [g for g in self.param_groups if g["part"] == "bp"]

    def load_state_dict(self, state_dict: dict) -> None:
        masters = {i: s["master"] for i, s in state_dict["state"].items() if "master" in s}
        super().load_state_dict(state_dict)  # casts every float state to its parameter's dtype: masters restored below
        params = [p for g in self.param_groups for p in g["params"]]  # the state_dict's index order
        for i, master in masters.items():
            self.state[params[i]]["master"] = master.to(device=params[i].device, dtype=torch.float32).clone()
        self._link_bp_optimizer()
        self._zo_group_of = {id(p): g for g in self.param_groups if g["part"] == "zo" for p in g["params"]}

    def _low_precision_zo(self) -> list[torch.Tensor]:
        return [p for g in self._groups("zo") for p in g["params"] if p.dtype in LOW_PRECISION]

    def _source(self, p: torch.Tensor) -> torch.Tensor:
        """What the ZO part perturbs and updates in place of ``p``: its float32 master, or ``p`` itself."""
        state = self.state.get(p)
        return state["master"] if state and "master" in state else p

    @staticmethod
    def _freeze(model: nn.Module, zo_ids: set[int], bp_ids: set[int]) -> None:
        for p in model.parameters():
            p.requires_grad_(id(p) in bp_ids)  # ZO and unused parameters build no graph and collect no .grad

    def _group(self, part: str) -> dict | None:
        return next((g for g in self.param_groups if g["part"] == part), None)

    def _groups(self, part: str) -> list[dict]:
        return [g for g in self.param_groups if g["part"] == part]

    def zo_group(self) -> dict | None:
        """The first ZO parameter group (the estimator's settings and ``step``); None when every layer is in BP."""
        return self._group("zo")

    @torch.no_grad()
    def apply_zo_update(self, grads: list[torch.Tensor]) -> None:
        """The ZO update for projected gradients ``grads`` (one per query) at the ZO groups' current
        ``step`` and ``lr``: what ``step`` applies after its passes, and what a replay repeats."""
        zo = self.zo_group()
        if zo is None:
            raise ValueError("apply_zo_update: the optimiser has no ZO part (bp_layers = all)")
        if len(grads) != zo["queries"]:
            raise ValueError(f"apply_zo_update: {len(grads)} projected gradients for queries={zo['queries']}")
        self._zo_update(zo, grads)

    def step(self, closure: Callable | None = None) -> torch.Tensor:  # type: ignore[override]
        """One ElasticZO step; returns the mean loss over all passes (a 0-dim tensor)."""
        if type(self).step is ElasticZO.step and _torch_step_wrapper_needed(self):
            return _profiled_step(type(self))(self, closure)
        return self._step(closure)  # a subclass's own step() is already wrapped by torch.optim

    step.hooked = True  # torch.optim must not wrap step() itself: _torch_step_wrapper_needed decides

    @torch.no_grad()
    def _step(self, closure: Callable | None) -> torch.Tensor:
        if closure is None:
            raise ValueError("ElasticZO.step needs a closure that computes the loss on the batch, e.g. "
                             "opt.step(lambda: F.cross_entropy(model(x), y)); it runs once per +- perturbation")
        zo, bps = self._group("zo"), self._groups("bp")
        bp_params = [p for g in bps for p in g["params"]]
        grads: list[torch.Tensor | None] = [None] * len(bp_params)
        call = pass_caller(closure)
        with run_order(self.model) if not self._order_checked else nullcontext([]) as ran:
            if zo is None:
                with phase("forward_backward"):
                    losses = [collect_pass(call, True, bp_params, grads)]
            else:
                losses = self._zo_passes(zo, call, bp_params, grads)
        if not self._order_checked:  # first step of a split in registration order: check the forward agrees
            check_order(self.split, ran)
            self._order_checked = True
        stacked = torch.stack(losses)
        if self.reduce is not None:  # all passes ran, nothing is updated yet: replicas combine here
            stacked, grads = self.reduce(stacked, grads, bp_params)
            losses = list(stacked.unbind())
        self._check_finite(stacked)
        if zo is not None:
            self._zo_apply(zo, losses)
        if bps:
            self._bp_update(bps, bp_params, grads, passes=1 if zo is None else len(losses) // (2 if zo["bp_grad"] == "plus" else 1))
        return stacked.mean()

    def _zo_passes(self, zo: dict, call: Callable, bp_params: list, grads: list) -> list[torch.Tensor]:
        """The 2q perturbed losses [L+_0, L-_0, L+_1, ...]; BP gradients summed into ``grads``."""
        eps, kind, t = zo["eps"], zo["noise"], zo["step"]
        backward, plus_only = bool(bp_params), zo["bp_grad"] == "plus"
        source = self._source if self._has_masters else None
        losses = []
        with pass_rng(self._rng_devices) as seed_rng:
            for j in range(zo["queries"]):
                *keys, dropout = derive_seeds(zo["seed"], t, j, [*range(len(self.zo_layers)), DROPOUT_STREAM])
                for sign in (1, -1):
                    seed_rng(dropout)
                    with frozen_statistics(self._stats, frozen=bool(losses)), \
                            perturbed(self.zo_layers, keys.__getitem__, sign * eps, kind, source, self._hooked()), \
                            phase("forward_backward" if backward else "forward"):
                        losses.append(collect_pass(call, backward and (sign > 0 or not plus_only), bp_params, grads))
        return losses

    def _hooked(self) -> dict:
        """The ZO layers' ``hooked_index``: their hooks and (owner, name) entries, built once."""
        if self._zo_index is None:
            self._zo_index = hooked_index(self.zo_layers)
        return self._zo_index

    def _check_finite(self, losses: torch.Tensor) -> None:
        if self.nonfinite != "raise":
            return
        if not (all(map(math.isfinite, losses.tolist())) if losses.is_cpu else bool(torch.isfinite(losses).all())):
            step = self.param_groups[0]["step"]
            raise NonFiniteLoss(f"ElasticZO step {step}: the loss is not finite ({[float(x) for x in losses]}); no "
                                "parameter was updated. Lower lr_zo/lr_bp or eps, or pass nonfinite='ignore' to skip such ZO steps")

    def _zo_apply(self, zo: dict, losses: list[torch.Tensor]) -> None:
        if losses[0].dtype in LOW_PRECISION and not self._warned_loss_dtype:
            self._warned_loss_dtype = True
            warnings.warn(f"ElasticZO: the closure returns a {losses[0].dtype} loss, whose resolution near the loss value "
                          "is coarser than the change a perturbation makes, so most projected gradients are exactly 0. "
                          "Compute the loss in float32, e.g. F.cross_entropy(logits.float(), y)", stacklevel=3)
        grads = [self._projected_grad(losses[2 * j], losses[2 * j + 1], zo) for j in range(zo["queries"])]
        self.last_projected_grads = torch.stack(grads)
        with phase("update"):
            self._zo_update(zo, grads)
        for g in self._groups("zo"):
            g["step"] += 1

    def _projected_grad(self, loss_plus: torch.Tensor, loss_minus: torch.Tensor, zo: dict) -> torch.Tensor:
        if loss_plus.dtype in LOW_PRECISION:
            loss_plus, loss_minus = loss_plus.float(), loss_minus.float()
        g = (loss_plus - loss_minus) / (2 * zo["eps"])
        g = torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0)  # a NaN/inf pass must not poison theta
        if zo["grad_clip"] is not None:
            g = g.clamp(-zo["grad_clip"], zo["grad_clip"])
        if zo["normalize"]:
            g = g / self._running_rms(zo, g)
        return g

    def _running_rms(self, zo: dict, g: torch.Tensor) -> torch.Tensor:
        """Bias-corrected EMA of g^2 (kept in the state of the first ZO parameter), then its root."""
        state = self.state[zo["params"][0]]
        if "g2_ema" not in state:
            state["g2_ema"] = torch.zeros((), dtype=g.dtype, device=g.device)
            state["g2_count"] = torch.zeros((), dtype=g.dtype, device=g.device)
        state["g2_ema"].mul_(RMS_DECAY).add_(g * g, alpha=1 - RMS_DECAY)
        state["g2_count"].add_(1)
        corrected = state["g2_ema"] / (1 - RMS_DECAY ** state["g2_count"])
        return corrected.sqrt().clamp_min(1e-12)

    def _zo_update(self, zo: dict, grads: list[torch.Tensor]) -> None:
        """theta <- theta (1 - lr wd) + sum_j (-g_j lr / q) z_j per ZO group, regenerating each z_j from its seed.
        Float16/bfloat16 parameters are updated through their float32 master, then rounded once."""
        q, groups = zo["queries"], self._groups("zo")
        for group in groups:
            if group["weight_decay"]:
                torch._foreach_mul_([self._source(p) for p in group["params"]], zo_decay_factor(group["lr"], group["weight_decay"]))
        for j, g in enumerate(grads):
            coefs = {id(group): g * (-group["lr"] / q) for group in groups}  # 0-dim: no host sync on a GPU
            if g.is_cpu:  # read once per group here, not once per tensor by the kernel's caller
                coefs = {k: float(c) for k, c in coefs.items()}
            keys = derive_seeds(zo["seed"], zo["step"], j, range(len(self.zo_layers)))
            for i, entries, directions in self._hooked().values():
                params = [owner._parameters[name] for owner, name in entries]
                sources = [self._source(p) for p in params] if self._has_masters else params
                directions(sources, keys[i], zo["noise"], [coefs[id(self._zo_group_of[id(p)])] for p in params], in_place=True)
        for p in self._low_precision_zo() if self._has_masters else []:
            p.copy_(self._source(p))

    def _bp_update(self, groups: list[dict], params: list, grads: list, passes: int) -> None:
        """The BP optimiser's step on the mean gradient of the passes."""
        for p, grad in zip(params, grads):
            p.grad = grad
        present = [g for g in grads if g is not None]
        if passes > 1 and present:
            torch._foreach_div_(present, passes)
        with phase("update"):
            self.bp_optimizer.step()
        for g in groups:
            g["step"] += 1


@functools.cache
def _profiled_step(cls: type) -> Callable:
    """torch's wrapper (profiler range, step hooks) around ``cls._step``, made once per class."""
    return torch.optim.Optimizer.profile_hook_step(cls._step)


def _torch_step_wrapper_needed(opt: ElasticZO) -> bool:
    """True if a profiler runs or step hooks are registered: then ``step`` goes through torch.optim's
    own wrapper (``Optimizer.profile_hook_step``). Otherwise it is skipped: its profiler range
    costs tens of microseconds a step, a few percent of a small model's ZO step, for nobody."""
    return bool(torch._C._autograd._profiler_enabled() or opt._optimizer_step_pre_hooks or opt._optimizer_step_post_hooks
                or torch_optimizer._global_optimizer_pre_hooks or torch_optimizer._global_optimizer_post_hooks)


def _as_groups(params: Iterable) -> list[dict]:
    """The user's parameters or param groups as a list of groups with list-valued 'params'."""
    params = list(params)
    if not params:
        raise ValueError("ElasticZO got an empty parameter list")
    groups = params if isinstance(params[0], dict) else [{"params": params}]
    out = []
    for i, group in enumerate(groups):
        if not isinstance(group, dict) or "params" not in group:
            raise TypeError(f"ElasticZO: param group {i} must be a dict with 'params', got {type(group).__name__}")
        members = group["params"]
        out.append(dict(group, params=[members] if isinstance(members, torch.Tensor) else list(members)))
    return out


def _partition(groups: list[dict], zo_ids: set[int], bp_ids: set[int], lr_zo: float,
               zo_opts: dict) -> tuple[list[dict], list[dict]]:
    """Split the user's groups into ZO groups and BP groups (each user group gives at most one of each).

    A ZO group's lr is the group's ``lr_zo`` (or ``lr``), else ``lr_zo``; a BP group's is its
    ``lr_bp`` (or ``lr``), else the BP optimiser's own default (``lr_bp`` for the default SGD)."""
    zo_groups, bp_groups = [], []
    for user in groups:
        extra = {k: v for k, v in user.items() if k not in ("params", "lr", "lr_zo", "lr_bp", "zo_weight_decay")}
        zo = [p for p in user["params"] if id(p) in zo_ids]
        bp = [p for p in user["params"] if id(p) in bp_ids]
        if zo:
            zo_groups.append(dict(zo_opts, params=zo, part="zo", lr=user.get("lr_zo", user.get("lr", lr_zo)),
                                  weight_decay=user.get("zo_weight_decay", zo_opts["weight_decay"])))
        if bp:
            lr = user.get("lr_bp", user.get("lr"))
            bp_groups.append(dict(extra, params=bp, part="bp", bp_grad=zo_opts["bp_grad"], step=0,
                                  **({} if lr is None else {"lr": lr})))
    return zo_groups, bp_groups
