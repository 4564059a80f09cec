"""`imgsearch certs` (`make certs`): a development CA, server and client certificates, a token.

Everything is made with the ``cryptography`` package: ECDSA P-256 keys, a self-signed CA, a
server certificate for the local names and the service names (server authentication only:
it cannot stand in for a client), a client certificate for the CLI, bench and the gateway's
downstream calls, and a random bearer token with the scopes search and feedback:write. The
output folder follows the rules of every command's output (:mod:`imgsearch_tools.outputs`): a
file this command did not make is never deleted or overwritten.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import secrets
import sys
from pathlib import Path

CA_CERT = "ca.pem"
CA_KEY = "ca-key.pem"
SERVER_CERT = "server.pem"
SERVER_KEY = "server-key.pem"
CLIENT_CERT = "client.pem"
CLIENT_KEY = "client-key.pem"
TOKEN = "token"
FILES = (CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY, CLIENT_CERT, CLIENT_KEY, TOKEN)
SECRETS = (CA_KEY, SERVER_KEY, CLIENT_KEY, TOKEN)
MAKER = "certs"  # the command's name in the output folder's marker
# What the development token may do: search and log conversions (not delete, not admin).
DEV_TOKEN_SCOPES = ("search", "feedback:write")
# The names a local or in-cluster client dials: loopback, and the services' own names.
DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1", "gateway", "retrieval", "ranking")


class CertsError(RuntimeError):
    """A certificates folder lacks some of the files `imgsearch certs` makes."""


def add_commands(subparsers) -> None:
    """Register certs."""
    p = subparsers.add_parser(
        "certs",
        help="make a development CA, server/client certificates and a token (make certs)",
        description="Write ca.pem, ca-key.pem, server.pem, server-key.pem, client.pem, "
        "client-key.pem and token into OUT. A folder that already holds a complete set made "
        "by this command is left as it is (--renew remakes it); a folder holding other files "
        "is refused unless --force, and a file this command did not make is never deleted or "
        "overwritten. For development only: production certificates come from your own CA.",
    )
    p.add_argument("--out", default="var/certs", help="output folder (default var/certs)")
    p.add_argument(
        "--host",
        action="append",
        default=[],
        help="extra DNS name or IP for the server certificate "
        f"(always: {', '.join(DEFAULT_HOSTS)})",
    )
    p.add_argument("--days", type=int, default=365, help="validity in days (default 365)")
    p.add_argument("--renew", action="store_true", help="remake a set this command made")
    p.add_argument(
        "--force",
        action="store_true",
        help="write into a folder holding other files, beside them (none is deleted or "
        "overwritten)",
    )
    p.set_defaults(handler=cmd_certs)


def cmd_certs(args) -> int:
    from imgsearch_tools.outputs import RefusedFolder

    hosts = [*DEFAULT_HOSTS, *args.host]
    try:
        written = write_dev_certs(args.out, hosts, args.days, args.renew, args.force)
    except RefusedFolder as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if written:
        print(f"wrote {', '.join(p.name for p in written)} into {args.out}")
    else:
        print(f"{args.out} already holds a set made by `imgsearch certs` (--renew remakes it)")
    return 0


# ------------------------------------------------------------------------------ making
def make_key():
    """A new ECDSA P-256 private key."""
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str):
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "imgsearch development"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def make_ca(common_name: str = "imgsearch development CA", days: int = 365):
    """A self-signed CA: (private key, certificate)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    key = make_key()
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def issue(
    ca_key,
    ca_cert,
    common_name: str,
    hosts: list[str] | tuple[str, ...] = (),
    server: bool = True,
    client: bool = True,
    days: int = 365,
):
    """A certificate signed by the CA: (private key, certificate).

    ``hosts`` become the subject alternative names (IPs as IP addresses); ``server`` and
    ``client`` choose the extended key usages.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID

    key = make_key()
    now = datetime.datetime.now(datetime.timezone.utc)
    names = []
    for host in dict.fromkeys(hosts):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    usages = [ExtendedKeyUsageOID.SERVER_AUTH] if server else []
    usages += [ExtendedKeyUsageOID.CLIENT_AUTH] if client else []
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return key, builder.sign(ca_key, hashes.SHA256())


def key_pem(key) -> bytes:
    """A private key as unencrypted PKCS#8 PEM (what gRPC reads)."""
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def cert_pem(cert) -> bytes:
    """A certificate as PEM."""
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.PEM)


def dev_tls_settings(folder: str | Path):
    """Settings that secure every link with a `make certs` folder.

    Returns
    -------
    tuple
        (config overrides by service name, ``"all"`` for every service: TLS with mutual TLS
        on each service port, reflection on, the gateway asking for the folder's token and
        presenting the client certificate to the stages; the :class:`ClientSecurity` of a
        client holding the client certificate and the token).
    """
    from imgsearch.security import ClientSecurity

    folder = Path(folder)
    missing = [name for name in FILES if not (folder / name).exists()]
    if missing:
        raise CertsError(f"{folder}: missing {', '.join(missing)}; make them with `make certs`")
    overrides = {
        "all": {
            "tls_cert": str(folder / SERVER_CERT),
            "tls_key": str(folder / SERVER_KEY),
            "tls_client_ca": str(folder / CA_CERT),
            "reflection": "on",
        },
        "gateway": {
            "auth_tokens_file": str(folder / TOKEN),
            "client_ca": str(folder / CA_CERT),
            "client_cert": str(folder / CLIENT_CERT),
            "client_key": str(folder / CLIENT_KEY),
        },
    }
    client = ClientSecurity(
        ca=str(folder / CA_CERT),
        cert=str(folder / CLIENT_CERT),
        key=str(folder / CLIENT_KEY),
        token_file=str(folder / TOKEN),
    )
    return overrides, client


# ----------------------------------------------------------------------------- writing
def write_dev_certs(
    out: str | Path, hosts=DEFAULT_HOSTS, days: int = 365, renew: bool = False, force: bool = False
) -> list[Path]:
    """Write a development CA, certificates and token into ``out``; returns what it wrote.

    A folder already holding the complete set this command made is left as it is unless
    ``renew``. The files are written into a temporary folder and moved into place
    (:func:`imgsearch_tools.outputs.staged_folder`): a folder with files of others is refused
    unless ``force``, which adds the certificates beside them and still overwrites none.

    Raises
    ------
    imgsearch_tools.outputs.RefusedFolder
        When ``out`` holds files this command did not make (without ``force``), or a file
        of one of its names that it did not make.
    """
    from imgsearch_tools import outputs

    out = Path(out)
    found = outputs.contents(out, MAKER)
    if found.made_by_us and set(FILES) <= set(found.ours) and not renew:
        if all((out / name).is_file() for name in FILES):
            return []
    ca_key, ca_cert = make_ca(days=days)
    server_key, server_cert = issue(
        ca_key, ca_cert, "imgsearch server", hosts, server=True, client=False, days=days
    )
    client_key, client_cert = issue(
        ca_key, ca_cert, "imgsearch client", (), server=False, client=True, days=days
    )
    contents = {
        CA_CERT: cert_pem(ca_cert),
        CA_KEY: key_pem(ca_key),
        SERVER_CERT: cert_pem(server_cert),
        SERVER_KEY: key_pem(server_key),
        CLIENT_CERT: cert_pem(client_cert),
        CLIENT_KEY: key_pem(client_key),
        # A token file's line: the token, then its scopes (imgsearch.tokens).
        TOKEN: f"{secrets.token_urlsafe(32)} {' '.join(DEV_TOKEN_SCOPES)}\n".encode(),
    }
    with outputs.staged_folder(out, MAKER, force=force) as staging:
        for name, data in contents.items():
            mode = 0o600 if name in SECRETS else 0o644
            fd = os.open(staging / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
    return [out / name for name in FILES]
