"""The FederatedRound a FederatedStudy creates: its deterministic name, its ownerReference to
the study, and a spec copied from the study's round template."""

from __future__ import annotations

from deeprad.operator.api import API_VERSION
from deeprad.operator.api.common import RoundMode
from deeprad.operator.api.federatedround import FederatedRoundSpec, StudyRef
from deeprad.operator.api.federatedstudy import FederatedStudySpec
from deeprad.operator.api.names import round_name
from deeprad.operator.decide.study import CreateRound
from deeprad.operator.render.meta import (
    LABEL_ROUND_NUMBER,
    LABEL_STUDY,
    Manifest,
    labels,
    owner_reference,
)


def round_spec(study: str, spec: FederatedStudySpec, create: CreateRound) -> FederatedRoundSpec:
    """Round `create.number` of the study: the template's settings, the study's model and data,
    the input checkpoint and the sites, and the study's admissionTimeout and priority (how long
    the round waits for sites, and its place in their queue); DP's δ is the study budget's, its
    noise multiplier the one the study decided (the template's, or calibrated to the budget).
    The final evaluation round keeps these settings (the sites' policies judge it as they
    would a training round) with spec.mode evaluate."""
    template = spec.round_template.model_copy(deep=True)
    dp = template.privacy.differential_privacy
    if dp is not None and spec.privacy_budget is not None:
        template.privacy.differential_privacy = dp.model_copy(update={
            "delta": spec.privacy_budget.delta,
            "noise_multiplier": create.noise_multiplier or dp.noise_multiplier})
    return FederatedRoundSpec(
        **{k: getattr(template, k) for k in type(template).model_fields},
        study_ref=StudyRef(name=study), round=create.number, model=spec.model, data=spec.data,
        input_checkpoint=create.input_checkpoint,
        sites=list(create.sites) if create.sites is not None else None,
        admission_timeout=spec.admission_timeout, priority=spec.priority,
        mode=RoundMode.EVALUATE if create.evaluate else RoundMode.TRAIN)


def federated_round(study: str, namespace: str, uid: str, spec: FederatedStudySpec,
                    create: CreateRound) -> Manifest:
    """The FederatedRound manifest `<study>-r<n>`, owned by (and collected with) the study."""
    return {"apiVersion": API_VERSION, "kind": "FederatedRound", "metadata": {
        "name": round_name(study, create.number), "namespace": namespace,
        "labels": labels("round", **{LABEL_STUDY: study,
                                     LABEL_ROUND_NUMBER: str(create.number)}),
        "ownerReferences": [owner_reference("FederatedStudy", study, uid)]},
        "spec": round_spec(study, spec, create).model_dump(mode="json", exclude_none=True)}
