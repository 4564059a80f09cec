"""A service port's TLS certificate: re-read on SIGHUP and on file change, watched for expiry.

gRPC asks :meth:`ServingCertificate.fetch` at every new handshake; it hands over a new
certificate once one was read, so connections opened after a rotation get it while those
already open keep theirs. A rotation that fails (a missing file, a key that does not match)
keeps the certificate being served and says so in the log. From ``expiry_margin_s`` before
the certificate's end the port's health says NOT_SERVING, so that probes and balancers take
it out before clients start failing handshakes; the gauge
``imgsearch_tls_certificate_expiry_seconds`` says how long is left.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
from collections.abc import Awaitable, Callable

import grpc
from prometheus_client import Gauge

from imgsearch.security import SecurityConfigError, read_file

logger = logging.getLogger("imgsearch.certificates")

CERT_EXPIRY = Gauge(
    "imgsearch_tls_certificate_expiry_seconds",
    "Seconds until the service port's TLS certificate expires (negative: expired).",
    ["service"],
)


def not_valid_after(cert_pem: bytes, setting: str = "tls_cert") -> float:
    """The end of validity (Unix seconds) of the first certificate of a PEM chain."""
    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError as exc:
        raise SecurityConfigError(f"{setting}: not a PEM certificate ({exc})") from None
    return cert.not_valid_after_utc.timestamp()


class ServingCertificate:
    """The certificate, key and client CA of one service port, and their rotation.

    Parameters
    ----------
    service:
        The service's name in logs and metrics.
    cert, key, client_ca:
        PEM certificate chain and private key; PEM CA bundle that every client's certificate
        must chain to (set: mutual TLS, the handshake fails without one).
    expiry_margin_s:
        How long before the certificate's end health turns NOT_SERVING.
    """

    def __init__(
        self, service: str, cert: str, key: str, client_ca: str = "", expiry_margin_s=86_400.0
    ):
        if not (cert and key):
            raise SecurityConfigError("tls_cert and tls_key go together: set both or neither")
        self.service = service
        self.paths = {"tls_cert": cert, "tls_key": key}
        if client_ca:
            self.paths["tls_client_ca"] = client_ca
        self.expiry_margin_s = expiry_margin_s
        self._gauge = CERT_EXPIRY.labels(service)
        self._pending: grpc.ServerCertificateConfiguration | None = None
        self.configuration, self.expires_at = self._read()
        self._stamps = self._file_stamps()

    def _read(self) -> tuple[grpc.ServerCertificateConfiguration, float]:
        files = {setting: read_file(path, setting) for setting, path in self.paths.items()}
        expires_at = not_valid_after(files["tls_cert"])
        configuration = grpc.ssl_server_certificate_configuration(
            [(files["tls_key"], files["tls_cert"])],
            root_certificates=files.get("tls_client_ca"),
        )
        # A key that does not match its certificate fails here, not at the next handshake.
        grpc.ssl_server_credentials([(files["tls_key"], files["tls_cert"])])
        return configuration, expires_at

    def _file_stamps(self) -> tuple:
        stamps = []
        for path in self.paths.values():
            try:
                stat = os.stat(path)  # follows links: a Kubernetes Secret swaps its link
                stamps.append((stat.st_ino, stat.st_mtime_ns, stat.st_size))
            except OSError:
                stamps.append(None)
        return tuple(stamps)

    def credentials(self) -> grpc.ServerCredentials:
        """Server credentials that pick up each rotation at the next handshake."""
        return grpc.dynamic_ssl_server_credentials(
            self.configuration,
            self.fetch,
            require_client_authentication="tls_client_ca" in self.paths,
        )

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's question at each handshake: a new configuration, or None to keep it."""
        pending, self._pending = self._pending, None
        return pending

    def reload(self) -> None:
        """Read the files again: the next handshakes get the certificate read.

        Raises
        ------
        SecurityConfigError
            When a file is missing or does not parse (the current certificate stays).
        """
        stamps = self._file_stamps()
        configuration, expires_at = self._read()
        self._stamps = stamps
        self.configuration, self.expires_at = configuration, expires_at
        self._pending = configuration
        logger.info(
            "TLS certificate read",
            extra={"service": self.service, "expires_in_s": round(self.seconds_left())},
        )

    def changed(self) -> bool:
        """Whether a file changed since it was last read."""
        return self._file_stamps() != self._stamps

    def seconds_left(self, now: float | None = None) -> float:
        """Seconds until the served certificate expires (negative once it has)."""
        now = datetime.datetime.now(datetime.timezone.utc).timestamp() if now is None else now
        return self.expires_at - now

    def fresh(self) -> bool:
        """Whether the certificate is valid for longer than the margin (and sets the gauge)."""
        left = self.seconds_left()
        self._gauge.set(left)
        return left > self.expiry_margin_s

    async def watch(
        self, set_serving: Callable[[bool], Awaitable[None]], interval_s: float = 30.0
    ) -> None:
        """Every ``interval_s``: re-read changed files, then report freshness to health.

        ``set_serving(False)`` is called when the certificate enters its expiry margin and
        ``set_serving(True)`` when a new one leaves it; runs until cancelled.
        """
        serving = True
        while True:
            if self.changed():
                try:
                    self.reload()
                except SecurityConfigError as exc:
                    logger.error(
                        "TLS certificate not rotated; still serving the previous one",
                        extra={"service": self.service, "problem": str(exc)},
                    )
            fresh = self.fresh()
            if fresh != serving:
                if not fresh:
                    logger.error(
                        "TLS certificate expires soon: health NOT_SERVING until it is rotated",
                        extra={"service": self.service, "expires_in_s": self.seconds_left()},
                    )
                await set_serving(fresh)
                serving = fresh
            await asyncio.sleep(interval_s)


def serving_certificate(name: str, config) -> ServingCertificate | None:
    """The service port's certificate from ``config`` (None: plaintext).

    Raises
    ------
    SecurityConfigError
        When the files are missing, unreadable or inconsistent.
    """
    if not (config.tls_cert or config.tls_key):
        if config.tls_client_ca:
            raise SecurityConfigError("tls_client_ca needs tls_cert and tls_key (mutual TLS)")
        return None
    return ServingCertificate(
        name,
        config.tls_cert,
        config.tls_key,
        config.tls_client_ca,
        expiry_margin_s=config.tls_expiry_margin_s,
    )


def watch_certificate(
    service, certificate: ServingCertificate, service_names: list[str], interval_s: float
) -> None:
    """Re-read ``certificate`` on SIGHUP and when its files change, and keep health
    NOT_SERVING while it is within its expiry margin.

    ``service`` is an :class:`imgsearch.serving.Service`: the re-read joins its reload hooks
    (what SIGHUP runs), the watch stops with it.
    """

    async def set_serving(fresh: bool) -> None:
        await service.set_serving(service_names, fresh)

    async def reread() -> None:
        certificate.reload()
        await set_serving(certificate.fresh())

    service.reload_hooks.append(reread)
    task = asyncio.get_running_loop().create_task(certificate.watch(set_serving, interval_s))

    async def stop_watching() -> None:
        task.cancel()

    service.stop_hooks.append(stop_watching)
