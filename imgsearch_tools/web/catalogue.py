"""What the page shows beside search results: photo files it may serve, users worth picking."""

from __future__ import annotations

import re
import threading
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

# Photo ids as Unsplash writes them (letters, digits, '-' and '_'): nothing else can name a file.
PHOTO_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
# Users the door remembers from the conversions logged through it.
MAX_LOGGED_USERS = 200
TOP_KEYWORDS = 3


@dataclass
class UserSummary:
    """A user the picker offers: their conversions and the keywords they searched most."""

    user_id: str
    conversions: int = 0
    last_converted_at: str = ""
    keywords: Counter = field(default_factory=Counter)
    source: str = "catalogue"

    def as_json(self) -> dict:
        return {
            "user_id": self.user_id,
            "conversions": self.conversions,
            "last_converted_at": self.last_converted_at,
            "top_keywords": [k for k, _ in self.keywords.most_common(TOP_KEYWORDS)],
            "source": self.source,
        }


class CatalogueView:
    """The served artifact set's photo ids and most recently active users.

    Parameters
    ----------
    artifacts_path:
        The artifact root or set the services serve ("" for none: no catalogue users and no
        images).
    images_dir:
        The folder of ``<photo_id>.jpg`` files (a catalogue's ``images/``), or "" for none.
    users:
        How many of the catalogue's users to offer, latest conversion first.
    """

    def __init__(self, artifacts_path: str = "", images_dir: str = "", users: int = 50):
        self.images_dir = Path(images_dir).resolve() if images_dir else None
        self.photo_ids: frozenset[str] = frozenset()
        self.version = ""
        self.catalogue_users: list[UserSummary] = []
        self.logged: OrderedDict[str, UserSummary] = OrderedDict()
        self._lock = threading.Lock()
        if artifacts_path:
            self._load(artifacts_path, users)

    def _load(self, artifacts_path: str, n_users: int) -> None:
        import pandas as pd

        from imgsearch import artifacts

        artifact_set = artifacts.resolve(artifacts_path)
        self.version = artifact_set.version
        catalogue_dir = artifact_set.file(artifacts.CATALOGUE_DIR)
        photos = pd.read_parquet(catalogue_dir / "photos.parquet", columns=["photo_id"])
        self.photo_ids = frozenset(photos["photo_id"].astype(str))
        users = pd.read_parquet(catalogue_dir / "users.parquet")
        conversions = pd.read_parquet(
            catalogue_dir / "conversions.parquet", columns=["user_idx", "converted_at", "keyword"]
        )
        if conversions.empty:
            return
        per_user = conversions.groupby("user_idx")["converted_at"].agg(["max", "size"])
        latest = per_user.sort_values("max", ascending=False).head(n_users)
        names = users.set_index("user_idx")["anonymous_user_id"]
        picked = conversions[conversions["user_idx"].isin(latest.index)]
        keywords = picked.groupby("user_idx")["keyword"].agg(lambda k: Counter(k.astype(str)))
        for user_idx, row in latest.iterrows():
            self.catalogue_users.append(
                UserSummary(
                    user_id=str(names[user_idx]),
                    conversions=int(row["size"]),
                    last_converted_at=row["max"].isoformat() + "Z",
                    keywords=keywords[user_idx],
                )
            )

    def image_path(self, photo_id: str) -> Path | None:
        """The image file of a known photo, or None (unknown id, no file, no images folder).

        Only ids of the served catalogue are looked up, and only as ``<id>.jpg`` directly in
        the images folder, so no request can name another file.
        """
        if self.images_dir is None or not PHOTO_ID.fullmatch(photo_id):
            return None
        if photo_id not in self.photo_ids:
            return None
        path = self.images_dir / f"{photo_id}.jpg"
        return path if path.is_file() else None

    def record(self, user_id: str, query: str, converted_at: str) -> None:
        """Remember a conversion logged through the door, so its user shows in the picker."""
        with self._lock:
            summary = self.logged.pop(user_id, None) or UserSummary(user_id, source="logged")
            summary.conversions += 1
            summary.last_converted_at = max(summary.last_converted_at, converted_at)
            if query:
                summary.keywords[query] += 1
            self.logged[user_id] = summary
            while len(self.logged) > MAX_LOGGED_USERS:
                self.logged.popitem(last=False)

    def recent_users(self, limit: int) -> list[dict]:
        """Users who converted through the door (latest first), then the catalogue's."""
        with self._lock:
            logged = [s.as_json() for s in reversed(self.logged.values())]
        seen = {u["user_id"] for u in logged}
        rest = [s.as_json() for s in self.catalogue_users if s.user_id not in seen]
        return (logged + rest)[:limit]
