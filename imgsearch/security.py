"""Trust at the ports: TLS and mutual TLS credentials, bearer tokens, loopback checks."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

import grpc

AUTHORIZATION_KEY = "authorization"
BEARER = "bearer "
# Any longer authorization value is refused without hashing it.
MAX_TOKEN_CHARS = 4096


class SecurityConfigError(ValueError):
    """A certificate, key or token file is missing, unreadable or inconsistent."""


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps a port on this machine (127.0.0.0/8, ::1, localhost)."""
    host = host.strip().strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def refuse_open_public_door(
    name: str, host: str, tokens_file: str, client_ca: str, insecure_public: bool
) -> None:
    """Refuse to serve ``host`` off loopback with no way to tell callers apart.

    The gateway is the public door: bound to a non-loopback address it needs bearer tokens or
    client certificates (mutual TLS), unless ``insecure_public`` says a network of its own
    (a private subnet, a NetworkPolicy) already is the lock.

    Raises
    ------
    SecurityConfigError
        Naming the settings that would open it.
    """
    if is_loopback(host) or tokens_file or client_ca or insecure_public:
        return
    raise SecurityConfigError(
        f"{name} would serve {host}, which is not loopback, to anyone: set "
        "IMGSEARCH_AUTH_TOKENS_FILE (--auth-tokens-file) or IMGSEARCH_TLS_CLIENT_CA "
        "(--tls-client-ca), bind 127.0.0.1, or pass --insecure-public "
        "(IMGSEARCH_INSECURE_PUBLIC=1) if the network itself admits only trusted clients"
    )


def read_file(path: str | Path, setting: str) -> bytes:
    """The bytes of ``path``; a missing or unreadable file names the setting that points at it."""
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise SecurityConfigError(f"{setting}: cannot read {path}: {exc.strerror}") from None


# ------------------------------------------------------------------------------------ client
def read_token(path: str | Path, setting: str = "token file") -> str:
    """The first token in ``path``: a token file's format (:mod:`imgsearch.tokens`), so one
    file can serve both; the scopes after the token are the server's business."""
    text = read_file(path, setting).decode("utf-8")
    for line in text.splitlines():
        fields = line.replace(",", " ").split()
        if fields and not fields[0].startswith("#"):
            return fields[0]
    raise SecurityConfigError(f"{setting} {path}: no token in it")


@dataclass(frozen=True)
class ClientSecurity:
    """How a client reaches an imgsearch port: plaintext or TLS, with or without a token.

    Parameters
    ----------
    ca:
        PEM CA bundle that the server's certificate must chain to; setting it (or a client
        certificate) makes the channel TLS.
    cert, key:
        The client's certificate and key, for servers that require mutual TLS.
    token_file:
        A file whose first token is sent as ``authorization: Bearer <token>``.
    """

    ca: str = ""
    cert: str = ""
    key: str = ""
    token_file: str = ""

    @property
    def tls(self) -> bool:
        return bool(self.ca or self.cert or self.key)

    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        """TLS channel credentials, or None for plaintext."""
        if not self.tls:
            return None
        if bool(self.cert) != bool(self.key):
            raise SecurityConfigError("the client certificate and key go together")
        return grpc.ssl_channel_credentials(
            root_certificates=read_file(self.ca, "client CA") if self.ca else None,
            private_key=read_file(self.key, "client key") if self.key else None,
            certificate_chain=read_file(self.cert, "client certificate") if self.cert else None,
        )

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """The metadata every call carries: the bearer token when there is one."""
        if not self.token_file:
            return ()
        return ((AUTHORIZATION_KEY, f"Bearer {read_token(self.token_file)}"),)

    def channel(self, target: str, options=None) -> grpc.Channel:
        """A synchronous channel to ``target``."""
        credentials = self.channel_credentials()
        if credentials is None:
            return grpc.insecure_channel(target, options=options)
        return grpc.secure_channel(target, credentials, options=options)

    def aio_channel(self, target: str, options=None) -> grpc.aio.Channel:
        """A ``grpc.aio`` channel to ``target``."""
        credentials = self.channel_credentials()
        if credentials is None:
            return grpc.aio.insecure_channel(target, options=options)
        return grpc.aio.secure_channel(target, credentials, options=options)
