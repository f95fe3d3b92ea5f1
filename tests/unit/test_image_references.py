"""Image references: one rule (deeprad.operator.api.images) for the site agent's trainer image,
the hub's `--job-image` and both charts' values; the charts carry the same patterns and agree
with it; every chart quotes its images; a digest pins an image and is used exactly as given;
the defaults pull what they pulled before.

Red team: an image value is also a way into the rendered YAML (a newline in a tag adds keys to
the container, or flags to the operator's command line) and into the agent's configuration.
Each attack is refused with the field and the fix, before anything is rendered or started."""

from __future__ import annotations

import argparse
import base64
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import kubernetes
import pytest
import yaml
from pydantic import BaseModel
from redteam import refused

from deeprad.core.errors import ConfigError
from deeprad.devenv.binaries import ToolsMissing, tool
from deeprad.operator import cli
from deeprad.operator.api.hospitalsite import HospitalSiteSpec
from deeprad.operator.api.images import (
    CHART_IMAGE_PATTERNS,
    IMAGE_REFERENCE_PATTERN,
    check_image_reference,
)
from deeprad.operator.hub import push
from deeprad.operator.options import HubOptions
from deeprad.operator.render import jobs
from deeprad.operator.site.config import AgentConfig, TrainingPlacement, parse_agent_config

ROOT = Path(__file__).resolve().parents[2]
HUB = ROOT / "helm" / "deeprad"
SITE = ROOT / "helm" / "deeprad-site"
APP_VERSION = yaml.safe_load((SITE / "Chart.yaml").read_text())["appVersion"]
DIGEST = "sha256:" + "0123456789abcdef" * 4
REFUSAL = "is not an image reference; write [registry/]path[:tag][@sha256:<64 hex digits>]"
# The image blocks of each chart's values (their schemas must carry CHART_IMAGE_PATTERNS).
IMAGE_BLOCKS = {HUB: ("operator", "aggregator"), SITE: ("agent", "training")}
IMAGE_HELPER = re.compile(r'include "deeprad(-site)?\.(image|\w+Image)"')

VALID = [
    "ghcr.io/deeprad/trainer:latest", "ghcr.io/deeprad/trainer:0.1.0", "deeprad:test", "trainer",
    "localhost:5000/deeprad/trainer:dev", "registry.example.org:443/a/b/c", "10.0.0.1:5000/x",
    f"ghcr.io/deeprad/trainer@{DIGEST}", f"ghcr.io/deeprad/trainer:0.1.0@{DIGEST}",
    "my-registry/team_a/model__x.y-z:v1.2_rc-3", "nvidia/cuda:12.4.1-runtime-ubuntu22.04",
    "Registry.Example.org/x:UPPER_tag",
]
INVALID = {
    "empty": "",
    "uppercase path": "ghcr.io/DeepRad/trainer:0.1.0",
    "trailing newline": "ghcr.io/deeprad/trainer:0.1.0\n",
    "space": "ghcr.io/deeprad/trainer 0.1.0",
    "yaml keys": "ghcr.io/deeprad/trainer:0.1.0\nsecurityContext: {privileged: true}",
    "a flag": "--privileged",
    "a url": "https://ghcr.io/deeprad/trainer:0.1.0",
    "short digest": "ghcr.io/deeprad/trainer@sha256:abc",
    "md5 digest": "ghcr.io/deeprad/trainer@md5:" + "0" * 32,
    "uppercase digest": "ghcr.io/deeprad/trainer@sha256:" + "A" * 64,
    "digest without algorithm": "ghcr.io/deeprad/trainer@" + "0" * 64,
    "129-character tag": "ghcr.io/deeprad/trainer:" + "a" * 129,
    "tag starting with a dot": "ghcr.io/deeprad/trainer:.hidden",
    "empty tag": "ghcr.io/deeprad/trainer:",
    "no name": ":latest",
    "empty path component": "ghcr.io//trainer",
    "non-ascii tag": "ghcr.io/deeprad/trainer:v\u00e9",
    "too long": "a/" * 300 + "b",
}


# ---- the rule ---------------------------------------------------------------------------------


@pytest.mark.parametrize("value", VALID)
def test_the_rule_accepts_image_references(value: str) -> None:
    assert check_image_reference(value) == value
    assert TrainingPlacement(image=value).image == value
    assert _parse_hub(["--job-image", value]).job_image == value


@pytest.mark.parametrize("value", INVALID.values(), ids=INVALID.keys())
def test_the_rule_refuses_everything_else(value: str) -> None:
    with pytest.raises(ValueError, match="image reference"):
        check_image_reference(value)
    with pytest.raises(ConfigError, match=r"training\.image: Value error, .*image reference"):
        parse_agent_config({"site": "st-marys", "training": {"image": value}}, "agent")


def test_defaults_pull_what_they_pulled_before() -> None:
    assert TrainingPlacement().image == "ghcr.io/deeprad/trainer:latest"
    assert HubOptions().job_image == _parse_hub([]).job_image == "ghcr.io/deeprad/deeprad:latest"


# ---- the operator's command line and the agent's configuration -----------------------------


def _hub_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deeprad operator")
    cli.add_arguments(parser)
    return parser


def _parse_hub(args: list[str]) -> argparse.Namespace:
    return _hub_parser().parse_args(["--mode", "hub", *args])


def test_redteam_job_image_smuggling_flags_is_refused_by_the_hub(
        capsys: pytest.CaptureFixture[str]) -> None:
    """`--job-image` with a newline and a flag (a chart value that slipped through) stops the
    hub at its command line: exit 2, before any Job exists."""
    value = "ghcr.io/deeprad/aggregator:0.1.0\n--hub-identity-secret=stolen"
    with pytest.raises(SystemExit) as exc:
        _parse_hub(["--job-image", value])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument --job-image: {value!r} {REFUSAL}" in err
    refused("hub --job-image with a newline and a flag", "hub: command line",
            err.strip().splitlines()[-1])


def test_redteam_trainer_image_with_yaml_keys_is_refused_by_the_agent(tmp_path: Path) -> None:
    """A trainer image carrying YAML in the agent's configuration file: the agent refuses to
    start, naming the field; no agent, no Job."""
    from deeprad.operator.site.config import load_agent_config

    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"site": "st-marys", "training": {
        "image": "ghcr.io/deeprad/trainer:0.1.0\nsecurityContext: {privileged: true}"}}))
    with pytest.raises(ConfigError) as exc:
        load_agent_config(config)
    message = str(exc.value)
    assert message.startswith(f"site agent config {config}: training.image: Value error, ")
    assert REFUSAL in message and "\n" not in message
    refused("site agent trainer image with YAML keys", "site agent: config file", message)


def test_redteam_push_agent_yaml_with_a_bad_image_is_refused_before_any_client(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The same check for a push site's agent.yaml, in the hub: one-line ConfigError (the
    PushConfigInvalid Event), raised before a client for the lab cluster is built."""
    lab = {"clusters": [{"name": "lab", "cluster": {"server": "https://lab.example.org:6443"}}],
           "users": [{"name": "lab", "user": {"token": "inline-token"}}],
           "contexts": [{"name": "lab", "context": {"cluster": "lab", "user": "lab"}}],
           "current-context": "lab"}
    secret = {"kubeconfig": yaml.safe_dump(lab),
              "agent.yaml": yaml.safe_dump({"site": "evil-lab", "training": {
                  "image": "ghcr.io/deeprad/trainer:0.1.0 --privileged"}})}
    data: dict[str, bytes | str] = {k: base64.b64encode(v.encode()).decode()
                                    for k, v in secret.items()}
    clients: list[Any] = []
    monkeypatch.setattr(kubernetes.client, "CoreV1Api", lambda _: type(
        "Core", (), {"read_namespaced_secret": lambda *a: kubernetes.client.V1Secret(data=data)})())
    monkeypatch.setattr(kubernetes.config, "new_client_from_config_dict",
                        lambda *a, **k: clients.append(a))
    with pytest.raises(ConfigError) as exc:
        push.push_agent("evil-lab", _push_site_spec(), kubernetes.client.ApiClient())
    message = str(exc.value)
    assert message.startswith("HospitalSite evil-lab: agent.yaml in the push Secret: "
                              "training.image: Value error, ")
    assert REFUSAL in message and "\n" not in message
    assert not clients
    refused("push agent.yaml trainer image with a flag", "hub: push agent.yaml", message)


def _push_site_spec() -> HospitalSiteSpec:
    spec = yaml.safe_load((ROOT / "examples" / "hospitalsite-charite.yaml").read_text())["spec"]
    return HospitalSiteSpec.model_validate(spec)


# ---- the charts -------------------------------------------------------------------------------


def _helm(*args: str) -> subprocess.CompletedProcess[str]:
    try:
        helm = tool("helm")
    except ToolsMissing as exc:
        pytest.skip(f"{exc}")
    return subprocess.run([helm, *args], capture_output=True, text=True, timeout=120)


def _template(chart: Path, values: dict[str, Any], tmp_path: Path, *flags: str
              ) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    return _helm("template", "st-marys", str(chart), "-n", "deeprad", "-f", str(path), *flags)


def _objects(out: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def _container(objs: list[dict[str, Any]]) -> dict[str, Any]:
    (deployment,) = [o for o in objs if o["kind"] == "Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return dict(container)


def _agent_config(objs: list[dict[str, Any]]) -> AgentConfig:
    (cm,) = [o for o in objs if o["kind"] == "ConfigMap" and "config.yaml" in o.get("data", {})]
    return AgentConfig.model_validate(yaml.safe_load(cm["data"]["config.yaml"]))


def _job_image(container: dict[str, Any]) -> str:
    args = container["args"]
    return str(args[args.index("--job-image") + 1])


@pytest.mark.parametrize("chart", IMAGE_BLOCKS, ids=["hub", "site"])
def test_chart_schemas_carry_the_one_image_rule(chart: Path) -> None:
    schema = json.loads((chart / "values.schema.json").read_text())
    assert IMAGE_REFERENCE_PATTERN.startswith("^")  # the parts below, joined
    for block in IMAGE_BLOCKS[chart]:
        image = schema["properties"][block]["properties"]["image"]
        assert image["additionalProperties"] is False
        patterns = {k: v.get("pattern") for k, v in image["properties"].items()
                    if k != "pullPolicy"}
        assert patterns == CHART_IMAGE_PATTERNS, f"{chart.name}: {block}.image"
        values = yaml.safe_load((chart / "values.yaml").read_text())[block]["image"]
        assert values["tag"] == "" and values["digest"] == ""  # the appVersion, unpinned


# (repository, tag, digest): the chart's schema and the Python rule must give the same verdict.
PARTS = [
    ("ghcr.io/deeprad/trainer", "", ""), ("ghcr.io/deeprad/trainer", "0.2.0", ""),
    ("localhost:5000/trainer", "dev", DIGEST), ("ghcr.io/deeprad/trainer", "", DIGEST),
    ("ghcr.io/DeepRad/trainer", "", ""), ("ghcr.io/deeprad/trainer", "a b", ""),
    ("ghcr.io/deeprad/trainer", "", "sha256:abc"), ("ghcr.io/deeprad/trainer:0.1.0", "", ""),
    ("ghcr.io/deeprad/trainer@" + DIGEST, "", ""), ("ghcr.io/deeprad/trainer", "", "md5:00"),
    ("https://ghcr.io/deeprad/trainer", "", ""), ("ghcr.io/deeprad/trainer", ".x", ""),
]


@pytest.mark.parametrize(("repository", "tag", "digest"), PARTS)
def test_chart_schema_and_the_rule_agree(tmp_path: Path, repository: str, tag: str,
                                         digest: str) -> None:
    """What the chart accepts renders into the agent's config as the rule composes it, and
    what it refuses the rule refuses too."""
    reference = repository + (f":{tag or APP_VERSION}" if tag or not digest else "") + \
        (f"@{digest}" if digest else "")
    try:
        check_image_reference(reference)
        valid = True
    except ValueError:
        valid = False
    out = _template(SITE, {"training": {"image": {
        "repository": repository, "tag": tag, "digest": digest}}}, tmp_path)
    if valid:
        assert _agent_config(_objects(out)).training.image == reference
    else:
        assert out.returncode != 0 and "/training/image/" in out.stderr, out.stderr


def test_digests_pin_images_and_are_used_as_given(tmp_path: Path) -> None:
    """Pinned by digest in the charts, the reference reaches the pods unchanged: the agent
    Deployment, the trainer Jobs the agent renders, the operator, and the aggregator Jobs the
    hub renders from `--job-image`."""
    site = _objects(_template(SITE, {"agent": {"image": {"digest": DIGEST}},
                                     "training": {"image": {"digest": DIGEST}}}, tmp_path))
    assert _container(site)["image"] == f"ghcr.io/deeprad/operator@{DIGEST}"
    placement = _agent_config(site).training
    assert placement.image == f"ghcr.io/deeprad/trainer@{DIGEST}"
    ctx = jobs.JobContext(name="j", namespace="ns", study="s", round_name="s-r1",
                          image="unused:1")
    trainer = jobs.trainer_job(ctx, "st-marys", placement, _Task(), 60)
    assert trainer["spec"]["template"]["spec"]["containers"][0]["image"] == placement.image

    hub = _container(_objects(_template(HUB, {
        "operator": {"image": {"digest": DIGEST}},
        "aggregator": {"image": {"tag": "0.2.0", "digest": DIGEST}}}, tmp_path)))
    assert hub["image"] == f"ghcr.io/deeprad/operator@{DIGEST}"
    job_image = _job_image(hub)
    assert job_image == f"ghcr.io/deeprad/aggregator:0.2.0@{DIGEST}"
    parsed = _hub_parser().parse_args(hub["args"])
    assert parsed.job_image == job_image
    aggregator = jobs.aggregator_job(
        jobs.JobContext(name="j", namespace="ns", study="s", round_name="s-r1",
                        image=parsed.job_image), _Task(), 60, jobs.StoreAccess("file:///s"), None)
    assert aggregator["spec"]["template"]["spec"]["containers"][0]["image"] == job_image


def test_chart_defaults_are_unchanged(tmp_path: Path) -> None:
    site = _objects(_template(SITE, {}, tmp_path))
    assert _container(site)["image"] == f"ghcr.io/deeprad/operator:{APP_VERSION}"
    assert _agent_config(site).training.image == f"ghcr.io/deeprad/trainer:{APP_VERSION}"
    hub = _container(_objects(_template(HUB, {}, tmp_path)))
    assert hub["image"] == f"ghcr.io/deeprad/operator:{APP_VERSION}"
    assert _job_image(hub) == f"ghcr.io/deeprad/aggregator:{APP_VERSION}"


@pytest.mark.parametrize("chart", IMAGE_BLOCKS, ids=["hub", "site"])
def test_every_chart_template_quotes_its_images(chart: Path) -> None:
    uses = [(t.name, line.strip()) for t in sorted((chart / "templates").glob("*.yaml"))
            for line in t.read_text().splitlines() if IMAGE_HELPER.search(line)]
    assert uses
    for name, line in uses:
        assert line.endswith("| quote }}"), f"{name}: {line}"


INJECTIONS = [
    (SITE, "agent", "tag", "0.1.0\n          securityContext:\n            privileged: true",
     "a privileged agent container"),
    (SITE, "training", "repository", "ghcr.io/deeprad/trainer:0.1.0\n  privileged: true",
     "keys in the trainer's config"),
    (HUB, "aggregator", "repository",
     "ghcr.io/deeprad/aggregator:0.1.0\n            - --peering\n            - evil",
     "flags on the operator's command line"),
    (HUB, "operator", "digest", f"{DIGEST}\n          command: [sh, -c, id]",
     "the operator's command"),
]


@pytest.mark.parametrize(("chart", "block", "field", "value", "goal"), INJECTIONS,
                         ids=[i[-1] for i in INJECTIONS])
def test_redteam_chart_image_values_cannot_inject_yaml(tmp_path: Path, chart: Path, block: str,
                                                       field: str, value: str, goal: str) -> None:
    """A newline in an image value, to add keys or flags: the values schema refuses it, naming
    the field and the form, and nothing is rendered."""
    out = _template(chart, {block: {"image": {field: value}}}, tmp_path)
    assert out.returncode != 0 and not out.stdout
    assert "values don't meet the specifications of the schema" in out.stderr
    where = f"/{block}/image/{field}"
    line = next(ln for ln in out.stderr.splitlines() if where in ln)
    assert "does not match pattern" in line
    refused(f"chart {block}.image.{field} injecting {goal}", f"helm: {chart.name} values schema",
            line)


@pytest.mark.parametrize(("chart", "block", "field", "value", "goal"), INJECTIONS,
                         ids=[i[-1] for i in INJECTIONS])
def test_quoted_images_stay_one_string_even_without_the_schema(
        tmp_path: Path, chart: Path, block: str, field: str, value: str, goal: str) -> None:
    """Defence in depth: with --skip-schema-validation the quoted image is still one string
    (the injection adds nothing), and the processes that read it refuse it."""
    objs = _objects(_template(chart, {block: {"image": {field: value}}}, tmp_path,
                              "--skip-schema-validation"))
    container, default = _container(objs), _container(_objects(_template(chart, {}, tmp_path)))
    assert set(container) == set(default)  # no key added
    assert container["command"] == default["command"]
    assert container["securityContext"] == default["securityContext"]
    if block in ("agent", "operator"):
        assert value in container["image"]  # the whole value, one string
    elif block == "aggregator":
        assert value in _job_image(container)
        assert "--peering" not in container["args"]
        assert len(container["args"]) == len(default["args"])
        with pytest.raises(SystemExit):  # and the hub would refuse to start with it
            _hub_parser().parse_args(container["args"])
    else:
        (cm,) = [o for o in objs if o["kind"] == "ConfigMap" and "config.yaml" in o["data"]]
        with pytest.raises(ConfigError, match=r"training\.image: Value error"):
            parse_agent_config(yaml.safe_load(cm["data"]["config.yaml"]), "agent")


class _Task(BaseModel):
    study: str = "s"
    round: int = 1
    site: str = "st-marys"
