"""The TLS and token flags every client command shares (search, bench), like ghz's."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from imgsearch.config import env

if TYPE_CHECKING:
    from imgsearch.security import ClientSecurity


def add_client_security_arguments(
    p: argparse.ArgumentParser, tls: bool = True, token_env: str = "TOKEN_FILE"
) -> None:
    """Add ``--cacert``/``--cert``/``--key`` (with ``tls``) and ``--token-file`` to ``p``.

    Defaults come from ``IMGSEARCH_CLIENT_CA``/``_CERT``/``_KEY`` and ``IMGSEARCH_<token_env>``
    when the flags are absent.
    """
    group = p.add_argument_group("TLS and tokens")
    if tls:
        group.add_argument(
            "--cacert",
            default=None,
            help="PEM CA of the server's certificate: connect with TLS (IMGSEARCH_CLIENT_CA)",
        )
        group.add_argument(
            "--cert", default=None, help="client certificate for mutual TLS (IMGSEARCH_CLIENT_CERT)"
        )
        group.add_argument(
            "--key", default=None, help="client private key for mutual TLS (IMGSEARCH_CLIENT_KEY)"
        )
    group.add_argument(
        "--token-file",
        default=None,
        help=f"file whose first token is sent as `authorization: Bearer` (IMGSEARCH_{token_env})",
    )
    p.set_defaults(token_env=token_env)


def client_security(args=None) -> ClientSecurity:
    """The ClientSecurity the flags of ``args`` describe, then the environment.

    Without ``args``: the environment alone (``IMGSEARCH_CLIENT_*``, ``IMGSEARCH_TOKEN_FILE``).
    A command registered with ``tls=False`` gets no certificate, whatever the environment says.
    """
    from imgsearch.security import ClientSecurity

    tls = args is None or hasattr(args, "cacert")
    token_env = getattr(args, "token_env", "TOKEN_FILE")

    def pick(flag: str, name: str) -> str:
        value = getattr(args, flag, None)
        return value if value is not None else env(name, "")

    return ClientSecurity(
        ca=pick("cacert", "CLIENT_CA") if tls else "",
        cert=pick("cert", "CLIENT_CERT") if tls else "",
        key=pick("key", "CLIENT_KEY") if tls else "",
        token_file=pick("token_file", token_env),
    )
