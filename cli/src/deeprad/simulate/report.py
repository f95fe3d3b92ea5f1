"""The end-of-study report: a per-round table, the comparison with centralized and local-only
training (on the test set and on the hospitals held out of training), leave-one-site-out when
run, a PNG of the curves, and the same data as JSON. Classification is read by AUROC;
segmentation by Dice, with HD95 and lesion sensitivity at 1 false positive per scan beside."""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict
from pathlib import Path
from typing import Any

from deeprad.core.protocol import PRIMARY_METRIC, ClinicalMetrics
from deeprad.simulate.config import SimulationConfig, is_benchmark
from deeprad.simulate.sites import Site

# Lesion sensitivity is read at this many false positives per scan (a ClinicalMetrics
# lesion_sensitivity key).
REPORTED_FP_PER_SCAN = "1"


def _fmt(x: float | None) -> str:
    return "  n/a" if x is None else f"{x:.3f}"


def mean_metrics(ms: list[dict[str, Any]]) -> dict[str, Any]:
    """The plain mean of each metric over models (the local-only mean): every model counts
    once, whatever its data set's size. Segmentation's fields only where some model has them."""
    out: dict[str, Any] = {}
    for k in ("loss", "auroc", "sensitivity", "specificity", "accuracy", "dice", "hd95"):
        vals = [m[k] for m in ms if m.get(k) is not None]
        if vals or k not in ("dice", "hd95"):
            out[k] = statistics.fmean(vals) if vals else None
    curves = [m["lesion_sensitivity"] for m in ms if m.get("lesion_sensitivity")]
    if curves:
        out["lesion_sensitivity"] = {fp: statistics.fmean(c[fp] for c in curves)
                                     for fp in curves[0]}
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
        final["local_only"] = {"mean": mean_metrics(list(local.values())), "sites": local}
        # The baselines train without DP-SGD even in a private study: they show what the data
        # allow, not a private alternative, and the report says so beside them.
        final["baselines_private"] = False
    if extra.get("held_out") is not None:
        final["held_out"] = extra["held_out"]
    report: dict[str, Any] = {
        "deeprad_report_version": 1,
        "task": cfg.task,
        "primary_metric": PRIMARY_METRIC[cfg.task],
        "synthetic_data": is_benchmark(cfg.dataset),
        "data": _data_note(cfg),
        "config": {
            **{k: v for k, v in asdict(cfg).items()
               if k not in ("model", "strategy", "train", "output", "report_json")},
            "model": cfg.model.model_dump(), "strategy": cfg.strategy.model_dump(),
            "train": cfg.train.model_dump(), "output": str(cfg.output),
        },
        "sites": {s.name: s.dataset.model_dump() for s in sites},
        "held_out_hospitals": extra.get("held_out_hospitals", {}),
        "rounds": rounds,
        "curves": {name: [m.model_dump() for m in c] for name, c in curves.items()},
        "final": final,
        "test_set": extra.get("test_set"),
        "privacy": extra.get("privacy"),
        "epsilon_spent": rounds[-1]["epsilon_spent"] if rounds and extra.get("privacy") else
        (0.0 if extra.get("privacy") else None),
        "secure_aggregation": cfg.secure_aggregation,
        "distributed_dp": extra.get("distributed_dp"),
        "best_round": extra.get("best_round"),
        "cross_site": extra.get("cross_site"),
        "leave_one_out": extra.get("leave_one_out"),
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


def _data_note(cfg: SimulationConfig) -> str:
    """What the data are, in the report's words (synthetic data say so)."""
    if cfg.dataset == "phantom":
        return "SYNTHETIC 2D tumour phantoms (not patient data)"
    if cfg.dataset == "anatomy":
        from deeprad.core.data.anatomy import DESCRIPTION

        return DESCRIPTION
    return f"the dataset folder {cfg.dataset}"


def print_report(report: dict[str, Any]) -> None:
    """The task's report: AUROC for classification, Dice and lesion detection for
    segmentation."""
    if report.get("task") == "segmentation":
        print_segmentation_report(report)
    else:
        print_classification_report(report)


def print_classification_report(report: dict[str, Any]) -> None:
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
    if "validation splits" in (report.get("test_set") or ""):
        print(f"\nTest set: {report['test_set']}")
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
    _print_ending(report, "auroc", "AUROC", "synthetic phantom data")


def _sens(m: dict[str, Any] | None) -> float | None:
    return ((m or {}).get("lesion_sensitivity") or {}).get(REPORTED_FP_PER_SCAN)


def _hd(x: float | None) -> str:
    return "  n/a" if x is None else f"{x:.1f}"


def _seg_line(name: str, m: dict[str, Any] | None, extra: str = "") -> str:
    m = m or {}
    return (f"{name[:26]:<26} {_fmt(m.get('dice')):>6} {_hd(m.get('hd95')):>8} "
            f"{_fmt(_sens(m)):>9} {_fmt(m.get('specificity')):>8} {_fmt(m.get('auroc')):>10}"
            f"{extra}")


# The final tables' header: Dice is over the scans with a lesion; "clean" is the share of
# healthy scans with nothing predicted (scan-level specificity).
_SEG_HEAD = (f"{'model':<26} {'Dice':>6} {'HD95 mm':>8} {'sens@1FP':>9} {'clean':>8} "
             f"{'scan AUROC':>10}")


def _seg_table(title: str, final: dict[str, Any]) -> None:
    """Dice, HD95, lesion sensitivity and scan AUROC of the federated model and the baselines,
    with the acceptance's two comparisons on Dice."""
    print(title)
    print(_SEG_HEAD)
    print(_seg_line("federated", final.get("federated")))
    if "centralized" not in final:
        return
    print(_seg_line("centralized (pooled data)", final["centralized"]))
    for name, m in final["local_only"]["sites"].items():
        print(_seg_line(f"{name} alone", m))
    mean = final["local_only"]["mean"]
    print(_seg_line("local-only mean", mean))
    fed = (final.get("federated") or {}).get("dice")
    cen = (final["centralized"] or {}).get("dice")
    loc = mean.get("dice")
    if fed is not None and cen:
        print(f"Dice: federated / centralized = {fed / cen:.3f}   federated - local-only mean "
              f"= {fed - (loc or 0):+.3f}")


def print_segmentation_report(report: dict[str, Any]) -> None:
    """Per-round table (global model on the test set; Dice on each hospital's validation
    split), the final models on the test set and on the held-out hospitals, leave-one-site-out
    when run, the cross-site matrix."""
    names = list(report["sites"])
    print(f"\nData: {report['data']}")
    head = (f"{'round':>5} {'loss':>6} {'Dice':>6} {'HD95':>6} {'sens@1FP':>8} {'AUROC':>6}  "
            + " ".join(f"{n[-12:]:>12}" for n in names))
    print("Global model per round: test-set loss / Dice (over scans with a lesion) / HD95 (mm) / "
          "lesion sensitivity at 1 false positive per scan / scan-level AUROC; then Dice on each "
          "hospital's validation split")
    print(head)
    print("-" * len(head))
    for row in report["rounds"]:
        g = row["global"]
        site_dice = " ".join(
            f"{_fmt((row['sites'][n]['validation'] or {}).get('dice')):>12}" for n in names)
        print(f"{row['round']:>5} {g['loss']:>6.3f} {_fmt(g.get('dice')):>6} "
              f"{_hd(g.get('hd95')):>6} {_fmt(_sens(g)):>8} {_fmt(g.get('auroc')):>6}  "
              f"{site_dice}")
        for rej in row["rejected"]:
            print(f"      rejected {rej['site']}: {rej['reason']}")
    if report.get("privacy"):
        print("(the baselines below train without DP-SGD: the non-private reference)")
    if report.get("stopped"):
        print(f"Study stopped early: {report['stopped']}")
    final = report["final"]
    _seg_table(f"\nFinal models on the test set, {report.get('test_set') or 'see report'}:",
               final)
    print("(Dice: mean over the scans with a lesion; clean: share of the healthy scans with "
          "nothing predicted)")
    held = final.get("held_out")
    if held:
        _seg_table(f"\nHeld-out hospital{'s' if len(held['sites']) > 1 else ''} "
                   f"{', '.join(held['sites'])} (never trained on; all its patients):", held)
    loso = report.get("leave_one_out")
    if loso:
        print("\nLeave-one-site-out: the federated study without each hospital, scored on that "
              "hospital's test split (in brackets: the full study's model, which trained there)")
        print("left out" + _SEG_HEAD[len("left out"):])
        for name, row in loso["sites"].items():
            with_it = (row.get("with_site") or {}).get("dice")
            print(_seg_line(name, row["without_site"], f"   ({_fmt(with_it)})"))
        print(_seg_line("mean", loso["mean"]))
    _print_ending(report, "dice", "Dice", "SYNTHETIC lesions on real MNI152 anatomy")


def _print_ending(report: dict[str, Any], metric: str, label: str, synthetic: str) -> None:
    """What both tasks' reports end with: the best round on validation data, the cross-site
    matrix, what the data are, and where the outputs went."""
    best = report.get("best_round")
    if best:
        print(f"best round on validation data: {best['round']} (pooled validation {label} "
              f"{_fmt(best['validation'].get(metric))}, its test {label} "
              f"{_fmt(best['test'].get(metric))})")
    print_cross_site(report.get("cross_site"))
    if report["synthetic_data"]:
        print(f"({synthetic}: these numbers demonstrate the pipeline, not a clinical result)")
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
    """The task's primary metric on the test set per round: federated, centralized, and each
    hospital alone."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs = [row["round"] for row in report["rounds"]]
    if not xs:  # stopped before the first round
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return
    metric = report.get("primary_metric", "auroc")
    label = "AUROC" if metric == "auroc" else metric.capitalize()
    ax.plot(xs, [row["global"][metric] for row in report["rounds"]], "o-", lw=2.5,
            label="federated")
    for name, curve in report["curves"].items():
        style = "s--" if name == "centralized" else ":"
        ax.plot(xs, [m[metric] for m in curve], style, lw=1.5 if name == "centralized" else 1,
                label=name.replace("local:", "alone: "))
    ax.set_xticks(xs)
    ax.set_xlabel("round (or the same number of epochs)")
    ax.set_ylabel(f"test-set {label}")
    title = "Deep-Rad local study"
    if report["synthetic_data"]:
        title += (" (synthetic lesions on real MNI152 anatomy)"
                  if report.get("task") == "segmentation" else " (synthetic phantoms)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
