"""Site and hub identities, the key CLI, and signed updates and checkpoints."""

from __future__ import annotations

import argparse
import base64
import hashlib
import logging
import pickle
import random
import stat
from pathlib import Path

import pytest
import yaml

from deeprad.cli import keys as keys_cli
from deeprad.core.errors import CheckpointError, ConfigError, UpdateRejected
from deeprad.core.identity import Identity, KeyRegistry, PublicIdentity
from deeprad.core.signing import (
    ReplayGuard,
    Statement,
    new_nonce,
    sign_message,
    sign_statement,
    verify_checkpoint,
    verify_message,
    verify_update,
)


def _private_b64(identity: Identity) -> list[str]:
    return [v.strip() for v in identity.private_files().values()]


def _run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="deeprad")
    sub = parser.add_subparsers(dest="command", required=True)
    keys_cli.register(sub)
    args = parser.parse_args(argv)
    return int(args.func(args))


# ---- identities -------------------------------------------------------------------------------


def test_key_folder_round_trip_with_private_files_0600(tmp_path: Path) -> None:
    ident = Identity.generate("st-marys")
    ident.save(tmp_path / "keys")
    for name in ("signing.key", "key-agreement.key"):
        assert stat.S_IMODE((tmp_path / "keys" / name).stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "keys" / "signing.pub").stat().st_mode) == 0o644
    loaded = Identity.load(tmp_path / "keys")
    assert loaded.public() == ident.public()
    assert loaded.name == "st-marys" and loaded.role == "site"
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        Identity.generate("st-marys").save(tmp_path / "keys")


def test_private_keys_never_in_repr_str_or_pickle() -> None:
    ident = Identity.generate("st-marys")
    for secret in _private_b64(ident):
        assert secret not in repr(ident) and secret not in str(ident)
        assert secret not in f"{ident}" and secret not in repr([ident])
    assert "st-marys" in repr(ident) and "sha256:" in repr(ident)
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(ident)


def test_identity_from_environment() -> None:
    ident = Identity.generate("lab-7")
    files = ident.private_files()
    env = {"DEEPRAD_IDENTITY_NAME": "lab-7",
           "DEEPRAD_SIGNING_KEY": files["signing.key"].strip(),
           "DEEPRAD_KEY_AGREEMENT_KEY": files["key-agreement.key"].strip()}
    assert Identity.from_env(env).public() == ident.public()
    with pytest.raises(ConfigError, match="DEEPRAD_SIGNING_KEY"):
        Identity.from_env({"DEEPRAD_IDENTITY_NAME": "lab-7"})
    with pytest.raises(ConfigError, match="decodes to 5 bytes"):
        Identity.from_env({**env, "DEEPRAD_SIGNING_KEY": base64.b64encode(b"short").decode()})
    with pytest.raises(ConfigError, match="base64"):
        Identity.from_env({**env, "DEEPRAD_SIGNING_KEY": "not base64 !"})


def test_registry_from_hospital_sites_and_json() -> None:
    a, b, hub = Identity.generate("a"), Identity.generate("b"), Identity.generate("hub", "hub")
    objs = [{"metadata": {"name": i.name},
             "spec": {"identity": {"signingKey": i.public().signing_key,
                                   "keyAgreementKey": i.public().key_agreement_key}}}
            for i in (a, b)]
    reg = KeyRegistry.from_hospital_sites(objs, hub=hub.public())
    assert reg.site("a") == a.public() and reg.site("c") is None
    assert reg.require_hub() == hub.public()
    assert KeyRegistry.from_json(reg.to_json()) == reg
    for secret in _private_b64(a) + _private_b64(hub):
        assert secret not in reg.to_json()
    with pytest.raises(ConfigError, match=r"HospitalSite c: spec.identity.signingKey"):
        KeyRegistry.from_hospital_sites([{"metadata": {"name": "c"}, "spec": {"identity": {}}}])


def test_keys_generate_and_site_register(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                         caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    assert _run_cli(["keys", "generate", "--out", str(tmp_path / "st-marys")]) == 0
    generated = capsys.readouterr().out
    ident = Identity.load(tmp_path / "st-marys")
    pub = ident.public()
    assert pub.signing_key in generated and pub.key_agreement_key in generated
    assert _run_cli(["site", "register", "st-marys", "--keys", str(tmp_path / "st-marys"),
                     "--namespace", "hospital"]) == 0
    stream = capsys.readouterr().out
    secret, site = list(yaml.safe_load_all(stream))
    assert secret["kind"] == "Secret" and secret["metadata"]["namespace"] == "hospital"
    assert Identity.from_private_bytes(
        "st-marys", "site", base64.b64decode(secret["stringData"]["signing.key"]),
        base64.b64decode(secret["stringData"]["key-agreement.key"])).public() == pub
    assert site["apiVersion"] == "deeprad.io/v1alpha1" and site["kind"] == "HospitalSite"
    assert "namespace" not in site["metadata"]  # cluster-scoped
    assert site["spec"]["identity"] == {"signingKey": pub.signing_key,
                                        "keyAgreementKey": pub.key_agreement_key}
    assert not any(s in yaml.safe_dump(site) for s in _private_b64(ident))
    # with -o the stream goes to a 0600 file, and nothing secret reaches stdout or logs
    out = tmp_path / "site.yaml"
    assert _run_cli(["site", "register", "st-marys", "--keys", str(tmp_path / "st-marys"),
                     "-o", str(out)]) == 0
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    printed = capsys.readouterr()
    for s in _private_b64(ident):
        assert s not in generated and s not in printed.out and s not in printed.err
        assert s not in caplog.text
    with pytest.raises(ConfigError, match="belongs to 'st-marys'"):
        _run_cli(["site", "register", "other", "--keys", str(tmp_path / "st-marys")])
    with pytest.raises(ConfigError, match="DNS-1123"):
        _run_cli(["site", "register", "Bad_Name", "--keys", str(tmp_path / "st-marys")])


# ---- signed updates ---------------------------------------------------------------------------

PARENT = hashlib.sha256(b"global model of round 2").hexdigest()


@pytest.fixture(scope="module")
def world() -> dict[str, Identity]:
    return {n: Identity.generate(n) for n in ("a", "b", "rogue")} | {
        "hub": Identity.generate("hub", "hub")}


@pytest.fixture
def registry(world: dict[str, Identity]) -> KeyRegistry:
    return KeyRegistry.of([world["a"].public(), world["b"].public(), world["hub"].public()])


def _update(site: Identity, payload: bytes, **over: object) -> tuple[Statement, str]:
    fields: dict[str, object] = {
        "kind": "update", "namespace": "ns", "study": "lung", "round": 3, "site": site.name,
        "parent_sha256": PARENT, "payload_sha256": hashlib.sha256(payload).hexdigest()}
    st = Statement.model_validate({**fields, **over})
    return st, sign_statement(site, st)


def _verify(st: Statement, sig: str | None, registry: KeyRegistry, payload: bytes,
            guard: ReplayGuard, site: str = "a") -> None:
    verify_update(st, sig, registry, site=site, namespace="ns", study="lung", round_no=3,
                  parent_sha256=PARENT, payload_sha256=hashlib.sha256(payload).hexdigest(),
                  replay=guard)


def test_valid_update_is_accepted_and_its_nonce_recorded(world: dict[str, Identity],
                                                         registry: KeyRegistry) -> None:
    guard = ReplayGuard()
    st, sig = _update(world["a"], b"payload")
    _verify(st, sig, registry, b"payload", guard)
    assert st.nonce in guard.seen
    # the canonical bytes carry a versioned domain prefix
    assert st.to_bytes().startswith(b"deeprad.io/signed-statement/v1\x00{")


def test_bad_updates_are_rejected_every_time(world: dict[str, Identity],
                                             registry: KeyRegistry) -> None:
    rng = random.Random(7)
    for _ in range(25):
        payload = rng.randbytes(64)
        guard = ReplayGuard()
        st, sig = _update(world["a"], payload)
        cases: dict[str, tuple[Statement, str | None, bytes, str]] = {
            "tampered payload": (st, sig, payload[:-1] + bytes([payload[-1] ^ 1]), "altered"),
            "unsigned": (st, None, payload, "unsigned"),
            "empty signature": (st, "", payload, "unsigned"),
            "forged signature": (st, base64.b64encode(rng.randbytes(64)).decode(), payload,
                                 "does not verify"),
            "edited statement": (st.model_copy(update={"round": 3, "nonce": new_nonce()}),
                                 sig, payload, "does not verify"),
            "stale parent": (*_update(world["a"], payload, parent_sha256="0" * 64), payload,
                             "stale"),
            "wrong round": (*_update(world["a"], payload, round=2), payload, "round 2"),
            "wrong study": (*_update(world["a"], payload, study="brain"), payload, "study"),
            "foreign (b's update in a's slot)": (*_update(world["b"], payload), payload,
                                                 "foreign"),
        }
        # a statement naming site a, signed with b's key
        claims_a = st.model_copy(update={"nonce": new_nonce()})
        b_key_sig = base64.b64encode(world["b"].sign(claims_a.to_bytes())).decode()
        cases["signed by another site's key"] = (claims_a, b_key_sig, payload, "does not verify")
        flipped = bytearray(base64.b64decode(sig))
        flipped[rng.randrange(64)] ^= 1 << rng.randrange(8)
        cases["flipped signature bit"] = (st, base64.b64encode(bytes(flipped)).decode(),
                                          payload, "does not verify")
        for name, (s, g, p, why) in cases.items():
            with pytest.raises(UpdateRejected, match=why) as err:
                _verify(s, g, registry, p, guard)
            assert err.value.site == "a", name
        assert guard.seen == frozenset(), "a rejected update must not burn a nonce"
        _verify(st, sig, registry, payload, guard)
        with pytest.raises(UpdateRejected, match="replayed"):
            _verify(st, sig, registry, payload, guard)
        # a replay is also refused in a later aggregator run that reloads the seen nonces
        with pytest.raises(UpdateRejected, match="replayed"):
            _verify(st, sig, registry, payload, ReplayGuard(guard.seen))


def test_unregistered_site_is_rejected(world: dict[str, Identity],
                                       registry: KeyRegistry) -> None:
    st, sig = _update(world["rogue"], b"x")
    with pytest.raises(UpdateRejected, match="not registered") as err:
        _verify(st, sig, registry, b"x", ReplayGuard(), site="rogue")
    assert err.value.site == "rogue"


def test_only_the_named_identity_can_sign(world: dict[str, Identity]) -> None:
    st, _ = _update(world["a"], b"x")
    with pytest.raises(ConfigError, match="signer"):
        sign_statement(world["b"], st)
    with pytest.raises(ConfigError, match="hub identity"):
        sign_statement(world["a"], st.model_copy(update={"kind": "checkpoint"}))
    with pytest.raises(ValueError, match="nonce"):
        Statement.model_validate({**st.model_dump(), "nonce": "reused"})


def test_signed_messages_are_domain_separated(world: dict[str, Identity]) -> None:
    sig = sign_message(world["a"], "secagg/advertise", b"payload")
    pub = world["a"].public()
    assert verify_message(pub, "secagg/advertise", b"payload", sig)
    assert not verify_message(pub, "secagg/unmask", b"payload", sig)
    assert not verify_message(pub, "secagg/advertise", b"payloaD", sig)


# ---- signed checkpoints -----------------------------------------------------------------------


def _checkpoint(hub: Identity, payload: bytes) -> tuple[Statement, str]:
    st = Statement(kind="checkpoint", namespace="ns", study="lung", round=3, site=hub.name,
                   parent_sha256=PARENT, payload_sha256=hashlib.sha256(payload).hexdigest())
    return st, sign_statement(hub, st)


def test_checkpoint_with_one_flipped_byte_is_refused(world: dict[str, Identity]) -> None:
    payload = bytes(range(256)) * 8
    st, sig = _checkpoint(world["hub"], payload)
    hub_pub = world["hub"].public()

    def check(data: bytes, s: Statement = st, g: str | None = sig,
              hub: PublicIdentity = hub_pub) -> None:
        verify_checkpoint(s, g, hub, namespace="ns", study="lung", round_no=3,
                          payload_sha256=hashlib.sha256(data).hexdigest(), parent_sha256=PARENT)

    check(payload)
    for pos in range(0, len(payload), 97):
        flipped = bytearray(payload)
        flipped[pos] ^= 0x01
        with pytest.raises(CheckpointError, match="altered"):
            check(bytes(flipped))
    with pytest.raises(CheckpointError, match="unsigned"):
        check(payload, g=None)
    site_signed = base64.b64encode(world["a"].sign(st.to_bytes())).decode()
    with pytest.raises(CheckpointError, match="does not verify"):
        check(payload, g=site_signed)
    with pytest.raises(CheckpointError, match="not a checkpoint by the hub"):
        check(payload, hub=world["a"].public())
    with pytest.raises(CheckpointError, match="round"):
        verify_checkpoint(st, sig, hub_pub, namespace="ns", study="lung", round_no=4,
                          payload_sha256=st.payload_sha256)
