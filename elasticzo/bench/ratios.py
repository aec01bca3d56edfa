"""The ratios the project promises (and the paper's claims), computed from the measured figures.
"""
from __future__ import annotations

from elasticzo.bench.grid import GRID_METHODS


def _entry(name: str, what: str, value: float, target: str | None = None, ok: bool | None = None) -> dict:
    return {"name": name, "what": what, "value": value, "target": target, "met": ok}


def compute_ratios(meas: dict[str, dict], runs: list[dict]) -> list[dict]:
    ms = lambda k: meas[k]["median_step_ms"]
    peak = lambda k: meas[k]["peak_bytes"]
    out = []
    if "zo-fp32" in meas:
        v = ms("zo-fp32") / ms("forward")
        out.append(_entry("zo_step_over_forward", "vanilla ZO step / one forward pass (time)", v, "<= 2.3", v <= 2.3))
        for peer, form in (("mezo", "reference form"), ("mezo_inplace", "in-place form")):
            v = ms(peer) / ms("zo-fp32")
            out.append(_entry(f"{peer}_over_ours", f"MeZO peer step ({form}) / our ZO step (time)", v, ">= 1.3",
                              v >= 1.3))
    for k in (1, 2, 3):
        if "zo-fp32" in meas and f"k{k}-fp32" in meas:
            v = 100.0 * (peak(f"k{k}-fp32") - peak("zo-fp32")) / peak("zo-fp32")
            target, ok = ("<= 1.7", v <= 1.7) if k == 1 else ("paper: 0.072 to 1.7", None)
            out.append(_entry(f"k{k}_memory_overhead_pct", f"ElasticZO k={k} peak over vanilla ZO peak (%)",
                              v, target, ok))
    if "bp-fp32" in meas:
        v = ms("bp-fp32") / ms("plain_bp")
        out.append(_entry("bp_over_plain", "our BP step / plain PyTorch loop step (time)", v, "<= 1.05", v <= 1.05))
    for name in GRID_METHODS:
        if f"{name}-fp32" in meas and f"{name}-int8" in meas:
            label = meas[f"{name}-fp32"]["label"]
            out.append(_entry(f"{name}_int8_memory_gain", f"{label}: FP32 peak / INT8 peak",
                              peak(f"{name}-fp32") / peak(f"{name}-int8"), "paper: 1.46 to 1.60"))
            out.append(_entry(f"{name}_int8_time_gain", f"{label}: FP32 step / INT8 step (time)",
                              ms(f"{name}-fp32") / ms(f"{name}-int8"), "paper: 1.38 to 1.42"))
    return out + _accuracy_claims(runs)


def _accuracy_claims(runs: list[dict]) -> list[dict]:
    acc = {(r["dataset"], r["method"]): r["final_acc"] for r in runs}
    out = []
    for (dataset, key), value in acc.items():
        name, precision = key.split("-")
        zo = acc.get((dataset, f"zo-{precision}"))
        if name in ("k1", "k2", "k3") and zo is not None:
            out.append(_entry(f"{dataset}_{key}_acc_gain", f"{dataset}: {key} - zo-{precision} final accuracy "
                              "(points)", value - zo, "paper: +5.2 to +9.5"))
        fp32 = acc.get((dataset, f"{name}-fp32"))
        if precision == "int8" and fp32 is not None:
            out.append(_entry(f"{dataset}_{name}_int8_acc_change", f"{dataset}: {key} - {name}-fp32 final "
                              "accuracy (points)", value - fp32, "paper: no loss"))
    return out


# ---------------------------------------------------------------------------------------------
# Entry point and writers
