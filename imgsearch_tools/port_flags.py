"""The flags of a server port's TLS and bearer tokens, shared by `serve` and `web`."""

from __future__ import annotations


def add_port_security_arguments(group, tokens_help: str) -> None:
    """``--tls-cert``, ``--tls-key``, ``--tls-client-ca`` and ``--auth-tokens-file``: how a
    server's port speaks TLS and which bearer tokens it accepts (`serve` and `web`)."""
    group.add_argument("--tls-cert", default=None, help="PEM certificate: serve TLS")
    group.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    group.add_argument(
        "--tls-client-ca", default=None, help="PEM CA: require client certificates (mutual TLS)"
    )
    group.add_argument("--auth-tokens-file", default=None, help=f"{tokens_help}, one per line")
