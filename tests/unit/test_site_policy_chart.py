"""The site chart's `policy:` values: rendered into the agent's config as a `SitePolicy`, checked
by the values schema with the same rules as the agent (one catalogue, one study pattern)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from deeprad.core.model_catalogue import MODEL_NAMES, model_digest
from deeprad.core.site_policy import STUDY_PATTERN, SitePolicy
from deeprad.devenv.binaries import ToolsMissing, tool
from deeprad.operator.site.config import AgentConfig

SITE = Path(__file__).resolve().parents[2] / "helm" / "deeprad-site"
SITE_EXAMPLE = SITE / "examples" / "values-st-marys.yaml"


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    try:
        binary = tool("helm")
    except ToolsMissing as exc:
        pytest.skip(f"{exc}")
    out = subprocess.run([binary, *args], capture_output=True, text=True, timeout=120)
    assert not check or out.returncode == 0, out.stderr
    return out


def _policy(values: Path | None = None, *sets: str) -> SitePolicy:
    args = ["template", "st-marys", str(SITE), "-n", "deeprad"]
    args += ["-f", str(values)] if values else []
    for item in sets:
        args += ["--set-json", item]
    docs = [d for d in yaml.safe_load_all(helm(*args).stdout) if d]
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap" and "config.yaml" in d.get("data", {})]
    return AgentConfig.model_validate(yaml.safe_load(cm["data"]["config.yaml"])).policy


def test_the_default_values_render_the_default_policy() -> None:
    assert _policy() == SitePolicy()


def test_the_example_renders_its_policy() -> None:
    assert _policy(SITE_EXAMPLE) == SitePolicy(
        studies=["research/*"], models=["densenet121", model_digest("tumor-cnn", {})],
        max_local_epochs=5, require_secure_aggregation=True)


def test_an_empty_study_list_allows_no_study() -> None:
    """Fail closed: `studies: []` is not the default `*/*`."""
    policy = _policy(None, "policy.studies=[]", "policy.maxEpsilonPerStudy=2.5",
                     "policy.delta=0.0001")
    assert policy.studies == [] and policy.max_epsilon_per_study == 2.5
    assert policy.delta == 0.0001
    # `studies:` left empty in a values file is null, which Helm drops: still no study.
    assert _policy(None, "policy.studies=null").studies == []


def test_an_empty_model_list_allows_no_model() -> None:
    """Fail closed like `studies`: `models: []` or null is no model, not the catalogue; the
    default lists the catalogue as it is today, so a network added later waits to be listed."""
    assert _policy(None, "policy.models=[]").models == []
    assert _policy(None, "policy.models=null").models == []
    assert _policy().models == list(MODEL_NAMES)


@pytest.mark.parametrize(("value", "says"), [
    ('policy.models=["os:system"]', "'/policy/models/0': 'os:system' does not match"),
    ('policy.studies=["everything"]', "'/policy/studies/0': 'everything' does not match"),
    ("policy.maxEpsilonPerStudy=0", "'/policy/maxEpsilonPerStudy': exclusiveMinimum"),
    ("policy.allowAll=true", "allowAll"),
])
def test_the_values_schema_refuses_a_bad_policy(value: str, says: str) -> None:
    out = helm("template", "x", str(SITE), "--set-json", value, check=False)
    assert out.returncode != 0 and says in out.stderr, out.stderr


def test_the_schema_follows_the_catalogue_and_the_study_pattern() -> None:
    schema = json.loads((SITE / "values.schema.json").read_text())["properties"]["policy"]
    models = re.compile(schema["properties"]["models"]["items"]["pattern"])
    assert all(models.match(name) for name in MODEL_NAMES)
    assert models.match(model_digest("tumor-cnn", {})) and not models.match("os:system")
    named = set(re.findall(r"[a-z][-a-z0-9]+", schema["properties"]["models"]["items"]
                           ["pattern"].split("sha256")[0]))
    assert named == set(MODEL_NAMES)
    assert schema["properties"]["studies"]["items"]["pattern"] == STUDY_PATTERN.pattern


def _notes(tmp_path: Path, values: Path | None = None) -> str:
    """The site chart's NOTES.txt as `helm install` prints it (rendered as a plain template of a
    copy of the chart: `helm template` skips NOTES.txt)."""
    import shutil

    chart = tmp_path / "deeprad-site"
    shutil.copytree(SITE, chart)
    (chart / "templates" / "NOTES.txt").rename(chart / "notes.txt")
    (chart / "templates" / "notes.yaml").write_text(
        'apiVersion: v1\nkind: ConfigMap\nmetadata: {name: notes}\n'
        'data: {notes: {{ tpl (.Files.Get "notes.txt") . | quote }}}\n')
    args = ["template", "st-marys", str(chart), "-n", "deeprad", "--show-only",
            "templates/notes.yaml"]
    out = helm(*args, *(["-f", str(values)] if values else [])).stdout
    return str(yaml.safe_load(out)["data"]["notes"])


def test_the_install_notes_name_every_open_door(tmp_path: Path) -> None:
    """An unpinned hub key, no store endpoint, egress to any host, an unpinned trainer image and
    `*/*` studies are each named after a default install; the example closes most of them."""
    notes = _notes(tmp_path)
    for setting in ("hubSigningKey is empty", "store.endpoint is empty",
                    "networkPolicy.store.cidrs is 0.0.0.0/0", "training.image.digest is empty",
                    "policy.studies allows */*"):
        assert setting in notes, setting
    example = _notes(tmp_path / "example", SITE_EXAMPLE)
    assert "0.0.0.0/0" not in example and "policy.studies allows" not in example
