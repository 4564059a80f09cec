"""Scoped bearer tokens: which scope each method needs, and the token files that grant them.

A token file holds one token per line, then the scopes it grants, separated by spaces or
commas; blank lines and ``#`` comments are ignored::

    # token                              scopes
    3q2-search-only-token                search
    kd8-app-backend-token                search feedback:write
    p0v-privacy-desk-token               feedback:delete

A line with a token and no scope is the format before scopes existed: it grants the file's
*legacy scopes* (``search`` for the gateway's tokens, ``admin`` for the admin ports' tokens,
the only thing those files ever opened) and a warning names the file. An unknown scope is
refused with the file and line.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from pathlib import Path

from imgsearch.admin.v1 import admin_service_pb2
from imgsearch.catalog.v1 import catalog_service_pb2
from imgsearch.feedback.v1 import feedback_service_pb2
from imgsearch.ranking.v1 import ranking_service_pb2
from imgsearch.retrieval.v1 import retrieval_service_pb2
from imgsearch.search.v1 import search_service_pb2
from imgsearch.security import AUTHORIZATION_KEY, BEARER, MAX_TOKEN_CHARS, SecurityConfigError

logger = logging.getLogger("imgsearch.tokens")

SEARCH = "search"
FEEDBACK_WRITE = "feedback:write"
FEEDBACK_DELETE = "feedback:delete"
CATALOG_WRITE = "catalog:write"
ADMIN = "admin"
SCOPES = (SEARCH, FEEDBACK_WRITE, FEEDBACK_DELETE, CATALOG_WRITE, ADMIN)


def _method(descriptor, service: str, method: str) -> str:
    full_name = descriptor.services_by_name[service].full_name
    return f"/{full_name}/{method}"


# The scope each method of the project's API needs. A method missing here (reflection, a
# mistyped or invented path) needs a valid token of any scope and then gets what the server
# has for it (UNIMPLEMENTED for an unknown one); health needs no token at all.
METHOD_SCOPES: dict[str, str] = {
    _method(search_service_pb2.DESCRIPTOR, "SearchService", "Search"): SEARCH,
    _method(retrieval_service_pb2.DESCRIPTOR, "RetrievalService", "Retrieve"): SEARCH,
    _method(ranking_service_pb2.DESCRIPTOR, "RankingService", "Rank"): SEARCH,
    _method(ranking_service_pb2.DESCRIPTOR, "RankingService", "Recommend"): SEARCH,
    _method(feedback_service_pb2.DESCRIPTOR, "FeedbackService", "LogConversions"): FEEDBACK_WRITE,
    _method(
        feedback_service_pb2.DESCRIPTOR, "FeedbackService", "DeleteUserEvents"
    ): FEEDBACK_DELETE,
    _method(retrieval_service_pb2.DESCRIPTOR, "RetrievalService", "EmbedImages"): CATALOG_WRITE,
    _method(catalog_service_pb2.DESCRIPTOR, "CatalogService", "UpsertPhotos"): CATALOG_WRITE,
    _method(catalog_service_pb2.DESCRIPTOR, "CatalogService", "DeletePhotos"): CATALOG_WRITE,
    _method(catalog_service_pb2.DESCRIPTOR, "CatalogService", "GetPhoto"): CATALOG_WRITE,
    _method(admin_service_pb2.DESCRIPTOR, "AdminService", "Reload"): ADMIN,
    _method(admin_service_pb2.DESCRIPTOR, "AdminService", "GetStatus"): ADMIN,
}


class TokenFileError(SecurityConfigError):
    """A token file is unreadable, empty, or names a scope that does not exist."""


class TokenSet:
    """Bearer tokens a port accepts, each with the scopes it grants.

    Only SHA-256 digests are kept; a presented token is hashed and compared with every digest
    in constant time, so neither the tokens nor their prefixes leak through timing.

    Parameters
    ----------
    grants:
        ``(token, scopes)`` pairs.
    source:
        Where they come from, for messages.
    """

    def __init__(self, grants: list[tuple[str, frozenset[str]]], source: str = ""):
        if not grants:
            raise TokenFileError(f"{source or 'token list'}: no token in it")
        self.source = source
        self._grants = [(hashlib.sha256(t.encode()).digest(), frozenset(s)) for t, s in grants]

    @classmethod
    def from_file(
        cls,
        path: str | Path,
        setting: str = "tokens file",
        legacy_scopes: tuple[str, ...] = (SEARCH,),
    ) -> TokenSet:
        """Read ``path`` (see the module's docstring for the format).

        Raises
        ------
        TokenFileError
            When the file cannot be read, holds no token, or names an unknown scope (with
            the line).
        """
        try:
            text = Path(path).read_bytes().decode("utf-8", errors="strict")
        except OSError as exc:
            raise TokenFileError(f"{setting}: cannot read {path}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise TokenFileError(f"{setting} {path}: not UTF-8 text") from None
        grants: list[tuple[str, frozenset[str]]] = []
        legacy = 0
        for number, line in enumerate(text.splitlines(), start=1):
            fields = line.replace(",", " ").split()
            if not fields or fields[0].startswith("#"):
                continue
            token, scopes = fields[0], fields[1:]
            unknown = [s for s in scopes if s not in SCOPES]
            if unknown:
                raise TokenFileError(
                    f"{setting} {path}, line {number}: unknown scope {unknown[0]!r} "
                    f"(known: {', '.join(SCOPES)})"
                )
            if not scopes:
                legacy += 1
                scopes = list(legacy_scopes)
            grants.append((token, frozenset(scopes)))
        if legacy:
            logger.warning(
                "%s %s: %d token(s) without scopes (the format before scopes) read as %s only; "
                "add the scopes after each token",
                setting,
                path,
                legacy,
                " ".join(legacy_scopes),
            )
        return cls(grants, f"{setting} {path}")

    def scopes(self, metadata) -> frozenset[str] | None:
        """The scopes of the call's ``authorization: Bearer <token>``; None for no known token."""
        for key, value in metadata or ():
            if key != AUTHORIZATION_KEY or not isinstance(value, str):
                continue
            if len(value) > MAX_TOKEN_CHARS or value[: len(BEARER)].lower() != BEARER:
                return None
            digest = hashlib.sha256(value[len(BEARER) :].strip().encode()).digest()
            granted: frozenset[str] | None = None
            for known, scopes in self._grants:
                if hmac.compare_digest(digest, known):
                    granted = scopes
            return granted
        return None

    def accepts(self, metadata) -> bool:
        """Whether the call carries a known token (whatever its scopes)."""
        return self.scopes(metadata) is not None
