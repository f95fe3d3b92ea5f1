"""Study progress: global AUROC (classification), Dice (segmentation) and loss round after
round, rounds done against planned, and ε spent against the study's privacy budget, in total
and per site."""

from __future__ import annotations

from grafana_foundation_sdk.builders import dashboard

from deeprad.operator.dashboards.panels import (
    SCOPE,
    label_variable,
    new_dashboard,
    query,
    series,
    single,
)

UID = "deeprad-study"
STUDY = "{{namespace}}/{{study}}"


def study_variables(board: dashboard.Dashboard) -> dashboard.Dashboard:
    """The namespace and study variables of the study-level dashboards."""
    return (board
            .with_variable(label_variable(
                "namespace", "Namespace", "label_values(deeprad_study_rounds_planned, namespace)"))
            .with_variable(label_variable(
                "study", "Study",
                'label_values(deeprad_study_rounds_planned{namespace=~"$namespace"}, study)')))


def build() -> dashboard.Dashboard:
    """The study-progress dashboard."""
    board = new_dashboard(UID, "Deep-Rad / Study progress",
                          "Global model quality per round, progress through the planned "
                          "rounds, and privacy budget spent.")
    return (
        study_variables(board)
        .with_row(dashboard.Row("Now"))
        .with_panel(single("Latest round", "Number of the study's latest round.",
                           query(f"max(deeprad_round_number{{{SCOPE}}})")))
        .with_panel(single("Rounds done", "Succeeded rounds as a share of spec.rounds.",
                           query(f"sum(deeprad_study_rounds_completed{{{SCOPE}}}) / "
                                 f"sum(deeprad_study_rounds_planned{{{SCOPE}}})"),
                           unit="percentunit"))
        .with_panel(single("Best AUROC", "Highest AUROC of a global model in the time range.",
                           query(f"max(max_over_time(deeprad_global_auroc{{{SCOPE}}}"
                                 "[$__range]))"),
                           unit="percentunit",
                           steps=[(None, "red"), (0.7, "yellow"), (0.9, "green")]))
        .with_panel(single("Privacy budget used", "ε spent as a share of the study's budget "
                                                  "(the study stops before exceeding it).",
                           query(f"max(deeprad_study_epsilon_spent{{{SCOPE}}} / "
                                 f"deeprad_study_epsilon_budget{{{SCOPE}}})"),
                           unit="percentunit",
                           steps=[(None, "green"), (0.75, "yellow"), (0.9, "red")]))
        .with_row(dashboard.Row("Model quality"))
        .with_panel(series("Global AUROC", "AUROC of the newest global model on the sites' "
                                           "validation data; one step per round.",
                           [query(f"deeprad_global_auroc{{{SCOPE}}}", STUDY)],
                           unit="percentunit", min_value=0, max_value=1))
        .with_panel(series("Global Dice", "Dice of the newest global model on the sites' "
                                          "validation data, pooled (segmentation studies); "
                                          "one step per round.",
                           [query(f"deeprad_global_dice{{{SCOPE}}}", STUDY)],
                           unit="percentunit", min_value=0, max_value=1))
        .with_panel(series("Global validation loss", "Validation loss of the newest global "
                                                     "model.",
                           [query(f"deeprad_global_loss{{{SCOPE}}}", STUDY)]))
        .with_row(dashboard.Row("Progress and privacy"))
        .with_panel(series("Rounds", "Rounds succeeded against spec.rounds.",
                           [query(f"deeprad_study_rounds_completed{{{SCOPE}}}",
                                  f"{STUDY} completed"),
                            query(f"deeprad_study_rounds_planned{{{SCOPE}}}",
                                  f"{STUDY} planned", "B")], min_value=0))
        .with_panel(series("Rounds finished by outcome", "Rounds that succeeded or failed.",
                           [query(f"sum by (namespace, study, outcome) (increase("
                                  f"deeprad_rounds_total{{{SCOPE}}}[$__rate_interval]))",
                                  f"{STUDY} {{{{outcome}}}}")], min_value=0))
        .with_panel(series("ε spent against budget", "Differential-privacy ε the study has "
                                                     "spent (largest site) and its budget.",
                           [query(f"deeprad_study_epsilon_spent{{{SCOPE}}}", f"{STUDY} spent"),
                            query(f"deeprad_study_epsilon_budget{{{SCOPE}}}", f"{STUDY} budget",
                                  "B")], min_value=0))
        .with_panel(series("ε spent per site", "ε the study has spent of each hospital's "
                                               "data, from the hub's signed ledger, against "
                                               "the study's budget.",
                           [query(f"deeprad_site_epsilon_spent{{{SCOPE}}}",
                                  f"{STUDY} {{{{site}}}}"),
                            query(f"deeprad_study_epsilon_budget{{{SCOPE}}}", f"{STUDY} budget",
                                  "B")], min_value=0))
    )
