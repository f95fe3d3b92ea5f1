"""`deeprad keys generate` and `deeprad site register NAME`: site and hub identities.

`keys generate` writes a key folder (private keys 0600). `site register` turns a site's key
folder into the two manifests that admit it: a Secret with its private keys, for the hospital's
own cluster only, and a HospitalSite with its public keys, for the hub.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deeprad.cli import site_token
from deeprad.core.errors import ConfigError
from deeprad.core.layout import check_name

if TYPE_CHECKING:  # cryptography and pydantic load when a command runs, not for --help
    from deeprad.core.identity import Identity

API_VERSION = "deeprad.io/v1alpha1"
DEFAULT_NAMESPACE = "deeprad"
DEFAULT_SECRET_NAME = "deeprad-site-identity"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `keys generate` and `site register` to the `deeprad` command."""
    keys = subparsers.add_parser("keys", help="signing and key-agreement keys")
    ksub = keys.add_subparsers(dest="keys_command", required=True)
    gen = ksub.add_parser(
        "generate", help="create an Ed25519 + X25519 key folder (private files 0600)",
        description="Writes signing.key and key-agreement.key (private, mode 0600), their .pub "
                    "files, name and role. Prints the public keys only.")
    gen.add_argument("--out", type=Path, required=True, help="key folder to create")
    gen.add_argument("--name", help="identity name (default: the folder's name)")
    gen.add_argument("--role", choices=["site", "hub"], default="site")
    gen.add_argument("--force", action="store_true", help="replace existing keys")
    gen.set_defaults(func=cmd_keys_generate)

    site = subparsers.add_parser("site", help="hospital sites")
    ssub = site.add_subparsers(dest="site_command", required=True)
    reg = ssub.add_parser(
        "register", help="print the Secret (site cluster) and HospitalSite (hub) for a site",
        description="Reads a key folder and prints a YAML stream: a Secret with the site's "
                    "private keys, to apply on the hospital's own cluster only, and a "
                    "HospitalSite carrying its public keys, to apply on the hub.")
    reg.add_argument("name", help="the site's name (a DNS-1123 label)")
    reg.add_argument("--keys", type=Path, required=True, help="key folder from `keys generate`")
    reg.add_argument("--namespace", default=DEFAULT_NAMESPACE,
                     help=f"namespace of the Secret on the site's cluster "
                          f"(default {DEFAULT_NAMESPACE})")
    reg.add_argument("--secret-name", default=DEFAULT_SECRET_NAME,
                     help=f"name of the Secret (default {DEFAULT_SECRET_NAME})")
    reg.add_argument("--study-namespace", action="append", default=[], metavar="NS",
                     dest="study_namespaces",
                     help="a hub namespace whose studies and rounds may use the site (repeat "
                          "for more; '*' for every namespace); none: no namespace may until "
                          "the HospitalSite's spec.studyNamespaces lists some")
    reg.add_argument("-o", "--output", type=Path,
                     help="write the YAML to this file (mode 0600) instead of stdout")
    reg.set_defaults(func=cmd_site_register)
    site_token.register(ssub)


def cmd_keys_generate(args: argparse.Namespace) -> int:
    """Create a key folder and print the public half."""
    from deeprad.core.identity import Identity

    name = args.name or Path(args.out).resolve().name
    identity = Identity.generate(check_name("identity", name), args.role)
    identity.save(args.out, overwrite=args.force)
    pub = identity.public()
    print(f"wrote {args.role} keys for {name} to {args.out} (private files mode 0600)")
    print(f"signingKey:      {pub.signing_key}")
    print(f"keyAgreementKey: {pub.key_agreement_key}")
    print(f"fingerprint:     {pub.fingerprint}")
    return 0


def site_manifests(identity: Identity, namespace: str = DEFAULT_NAMESPACE,
                   secret_name: str = DEFAULT_SECRET_NAME,
                   study_namespaces: Sequence[str] = ()) -> list[dict[str, Any]]:
    """[Secret for the site's cluster, HospitalSite for the hub] of a site identity; the
    HospitalSite serves `study_namespaces` (hub namespaces, or "*"), none when empty."""
    if identity.role != "site":
        raise ConfigError(f"{identity.name} holds hub keys; register a site with keys made by "
                          "`deeprad keys generate --role site`")
    check_name("namespace", namespace)
    check_name("secret", secret_name)
    served = sorted(set(study_namespaces))
    for ns in served:
        if ns != "*":
            check_name("study namespace", ns)
    if "*" in served and len(served) > 1:
        raise ConfigError("--study-namespace '*' already allows every namespace: give it "
                          "alone, or name the namespaces")
    pub = identity.public()
    labels = {"app.kubernetes.io/part-of": "deeprad", "deeprad.io/site": identity.name}
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": secret_name, "namespace": namespace, "labels": labels,
                     "annotations": {"deeprad.io/fingerprint": pub.fingerprint}},
        "type": "Opaque",
        "stringData": {**{k: v.strip() for k, v in identity.private_files().items()},
                       "name": identity.name, "role": identity.role},
    }
    site = {
        "apiVersion": API_VERSION,
        "kind": "HospitalSite",
        "metadata": {"name": identity.name, "labels": labels,
                     "annotations": {"deeprad.io/fingerprint": pub.fingerprint}},
        "spec": {"identity": {"signingKey": pub.signing_key,
                              "keyAgreementKey": pub.key_agreement_key},
                 **({"studyNamespaces": served} if served else {})},
    }
    return [secret, site]


def cmd_site_register(args: argparse.Namespace) -> int:
    """Print or write the site's Secret and HospitalSite."""
    import yaml

    from deeprad.core.identity import NAME_FILE, Identity

    name = check_name("site", args.name)
    has_name = (Path(args.keys) / NAME_FILE).is_file()
    identity = Identity.load(args.keys, name=None if has_name else name)
    if identity.name != name:
        raise ConfigError(f"key folder {args.keys} belongs to {identity.name!r}, not {name!r}")
    secret, site = site_manifests(identity, args.namespace, args.secret_name,
                                  args.study_namespaces)
    fingerprint = identity.public().fingerprint
    served = site["spec"].get("studyNamespaces")
    serves = (f"# It serves the studies of hub namespace(s): {', '.join(served)}.\n" if served
              else "# spec.studyNamespaces is empty: NO hub namespace may use this site until "
                   "you list some\n# (`--study-namespace NS`, or edit the field).\n")
    text = (
        f"# Secret: apply on the cluster of hospital {name} ONLY; it holds private keys.\n"
        + yaml.safe_dump(secret, sort_keys=False)
        + f"---\n# HospitalSite: apply on the hub; public keys only ({fingerprint}).\n"
        + serves
        + yaml.safe_dump(site, sort_keys=False)
    )
    if args.output:
        fd = os.open(args.output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        print(f"wrote Secret {args.namespace}/{args.secret_name} and HospitalSite {name} to "
              f"{args.output} (mode 0600)", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0
