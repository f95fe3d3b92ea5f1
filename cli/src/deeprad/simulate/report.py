"""The end-of-study report: a per-round table, the comparison with centralized and local-only
training, a PNG of the curves, and the same data as JSON."""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict
from pathlib import Path
from typing import Any

from deeprad.core.protocol import ClinicalMetrics
from deeprad.simulate.config import SimulationConfig
from deeprad.simulate.sites import Site


def _fmt(x: float | None) -> str:
    return "  n/a" if x is None else f"{x:.3f}"


def _mean_metrics(ms: list[dict[str, Any]]) -> dict[str, Any]:
    keys = ("loss", "auroc", "sensitivity", "specificity", "accuracy")
    out: dict[str, Any] = {}
    for k in keys:
        vals = [m[k] for m in ms if m.get(k) is not None]
        out[k] = statistics.fmean(vals) if vals else None
    return out


def build_report(cfg: SimulationConfig, sites: list[Site], rounds: list[dict[str, Any]],
                 curves: dict[str, list[ClinicalMetrics]], wall_s: float,
                 extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Assemble, print and save the report; returns it as a dict. `extra`: privacy summary,
    why the study stopped early (or None), the last round run, the initial model's metrics."""
    extra = extra or {}
    final: dict[str, Any] = {
        "federated": rounds[-1]["global"] if rounds else extra.get("initial_metrics")}
    if curves:
        final["centralized"] = curves["centralized"][-1].model_dump()
        local = {n.split(":", 1)[1]: c[-1].model_dump() for n, c in curves.items()
                 if n.startswith("local:")}
        final["local_only"] = {"mean": _mean_metrics(list(local.values())), "sites": local}
        # The baselines train without DP-SGD even in a private study: they show what the data
        # allow, not a private alternative, and the report says so beside them.
        final["baselines_private"] = False
    report: dict[str, Any] = {
        "deeprad_report_version": 1,
        "synthetic_data": cfg.dataset == "phantom",
        "config": {
            **{k: v for k, v in asdict(cfg).items()
               if k not in ("model", "strategy", "train", "output", "report_json")},
            "model": cfg.model.model_dump(), "strategy": cfg.strategy.model_dump(),
            "train": cfg.train.model_dump(), "output": str(cfg.output),
        },
        "sites": {s.name: s.dataset.model_dump() for s in sites},
        "rounds": rounds,
        "curves": {name: [m.model_dump() for m in c] for name, c in curves.items()},
        "final": final,
        "privacy": extra.get("privacy"),
        "epsilon_spent": rounds[-1]["epsilon_spent"] if rounds and extra.get("privacy") else
        (0.0 if extra.get("privacy") else None),
        "secure_aggregation": cfg.secure_aggregation,
        "distributed_dp": extra.get("distributed_dp"),
        "best_round": extra.get("best_round"),
        "cross_site": extra.get("cross_site"),
        "stopped": extra.get("stopped"),
        "final_round": extra.get("final_round", len(rounds)),
        "wall_time_s": wall_s,
        "checkpoint": str(cfg.output / "final.safetensors"),
        "plot": str(cfg.output / "curves.png"),
    }
    print_report(report)
    plot_curves(report, cfg.output / "curves.png")
    text = json.dumps(report, indent=2)
    (cfg.output / "report.json").write_text(text)
    if cfg.report_json:
        cfg.report_json.parent.mkdir(parents=True, exist_ok=True)
        cfg.report_json.write_text(text)
    return report


def print_report(report: dict[str, Any]) -> None:
    """Per-round table (global model on the held-out test set; AUROC on each site's
    validation split), then the comparison with the baselines."""
    names = list(report["sites"])
    dp = report.get("privacy") is not None
    sa = bool(report.get("secure_aggregation"))
    head = f"{'round':>5} {'loss':>6} {'AUROC':>6} {'sens':>6} {'spec':>6}  " + " ".join(
        f"{n[-12:]:>12}" for n in names) + (f" {'ε round':>8} {'ε spent':>8}" if dp else "") + (
        f" {'quant.err':>9}" if sa else "")
    print("\nGlobal model per round: test-set loss / AUROC / sensitivity / specificity; "
          "then AUROC on each hospital's validation split")
    print(head)
    print("-" * len(head))
    for row in report["rounds"]:
        g = row["global"]
        site_auc = " ".join(f"{_fmt(row['sites'][n]['validation']['auroc']):>12}"
                            if row["sites"][n]["validation"] else f"{'n/a':>12}" for n in names)
        tail = (f" {row['epsilon_round']:>8.3f} {row['epsilon_spent']:>8.3f}" if dp else "")
        if sa:
            bound = (row.get("secure_aggregation") or {}).get("quantization_bound")
            tail += f" {bound:>9.1e}" if bound is not None else f" {'n/a':>9}"
        print(f"{row['round']:>5} {g['loss']:>6.3f} {_fmt(g['auroc']):>6} "
              f"{_fmt(g['sensitivity']):>6} {_fmt(g['specificity']):>6}  {site_auc}{tail}")
        for rej in row["rejected"]:
            print(f"      rejected {rej['site']}: {rej['reason']}")
    privacy = report.get("privacy")
    if privacy:
        print(f"\nDifferential privacy: DP-SGD, study budget ε={privacy['epsilon_budget']:g} "
              f"δ={privacy['delta']:g} ({privacy['accountant']}), clip "
              f"{privacy['max_grad_norm']:g}; ε spent {report['epsilon_spent']:.3f}; noise "
              "multiplier per site: " + ", ".join(
                  f"{s} {z:.3f}" for s, z in privacy["noise_multiplier"].items()))
    if sa:
        print("Secure aggregation: the hub saw only the masked sum; quant.err = worst-case "
              "absolute error per value of the decoded mean update")
    ddp = report.get("distributed_dp")
    if ddp:
        print(f"Distributed DP (site-level: one site's update per round): ε spent "
              f"{ddp['epsilon_spent']:.3f} of {ddp['epsilon']:g} (δ={ddp['delta']:g}, "
              f"{ddp['rounds']} round(s) planned); L2 clip {ddp['l2_clip']:g}, summed noise "
              f"σ={ddp['noise_stddev']:.4g} from >= {ddp['noise_shares']} site share(s)")
    if report.get("stopped"):
        print(f"Study stopped early: {report['stopped']}")
    final = report["final"]
    fed = final["federated"]["auroc"]
    print(f"\nFinal test-set AUROC  federated: {_fmt(fed)}")
    if "centralized" in final:
        cen = final["centralized"]["auroc"]
        loc = final["local_only"]["mean"]["auroc"]
        plain = ", no DP" if privacy else ""
        if privacy:
            print("                      (the baselines below train without DP-SGD: the "
                  "non-private reference, not a private alternative)")
        print(f"                      centralized (pooled data, same epochs{plain}): "
              f"{_fmt(cen)}")
        for name, m in final["local_only"]["sites"].items():
            print(f"                      {name} alone{' (no DP)' if privacy else ''}: "
                  f"{_fmt(m['auroc'])}")
        print(f"                      local-only mean{' (no DP)' if privacy else ''}: "
              f"{_fmt(loc)}")
        if fed is not None and cen:
            print(f"federated{' (DP)' if privacy else ''} / centralized{plain} = "
                  f"{fed / cen:.3f}   "
                  f"federated - local-only mean = {fed - (loc or 0):+.3f}")
    best = report.get("best_round")
    if best:
        print(f"best round on validation data: {best['round']} (pooled validation AUROC "
              f"{_fmt(best['validation']['auroc'])}, its test AUROC {_fmt(best['test']['auroc'])})")
    print_cross_site(report.get("cross_site"))
    if report["synthetic_data"]:
        print("(synthetic phantom data: these numbers demonstrate the pipeline, not a "
              "clinical result)")
    print(f"wall time {report['wall_time_s']:.1f}s; checkpoint {report['checkpoint']}; "
          f"plot {report['plot']}")


def print_cross_site(matrix: dict[str, Any] | None) -> None:
    """Each model (row) on each hospital's held-out validation split and pooled (columns)."""
    if not matrix:
        return
    columns = matrix["columns"]
    width = max(12, *(len(c) for c in columns))
    print(f"\nCross-site evaluation: {matrix['metric'].upper()} of each model (row) on "
          f"{matrix['held_out']} (column)")
    print(f"{'model':<22}" + "".join(f"{c[-width:]:>{width + 1}}" for c in columns))
    for name, row in matrix["rows"].items():
        print(f"{name.replace('local:', 'alone: ')[:22]:<22}"
              + "".join(f"{_fmt(row[c]):>{width + 1}}" for c in columns))


def plot_curves(report: dict[str, Any], path: Path) -> None:
    """Test-set AUROC per round: federated, centralized, and each hospital alone."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs = [row["round"] for row in report["rounds"]]
    if not xs:  # stopped before the first round
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return
    ax.plot(xs, [row["global"]["auroc"] for row in report["rounds"]], "o-", lw=2.5,
            label="federated")
    for name, curve in report["curves"].items():
        style = "s--" if name == "centralized" else ":"
        ax.plot(xs, [m["auroc"] for m in curve], style, lw=1.5 if name == "centralized" else 1,
                label=name.replace("local:", "alone: "))
    ax.set_xticks(xs)
    ax.set_xlabel("round (or the same number of epochs)")
    ax.set_ylabel("test-set AUROC")
    title = "Deep-Rad local study"
    if report["synthetic_data"]:
        title += " (synthetic phantoms)"
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
