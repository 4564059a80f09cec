"""A user's latest logged conversions, read per ranking request within a deadline."""

from __future__ import annotations

import numpy as np

from imgsearch.catalogue import Catalogue
from imgsearch.conversion_store.background import BackgroundStore

NO_PHOTOS = np.zeros(0, dtype=np.int64)


class LoggedHistory:
    """Reads what a user converted since the model was trained, for the rankers to fold in.

    Parameters
    ----------
    store:
        The conversion store, or None when fold-in of logged conversions is off.
    limit:
        The most events read per request (the newest).
    timeout_s:
        How long a request waits for them; past that it goes on without them.
    """

    def __init__(self, store: BackgroundStore | None, limit: int, timeout_s: float):
        self.store = store
        self.limit = limit
        self.timeout_s = timeout_s

    @property
    def enabled(self) -> bool:
        return self.store is not None and self.limit > 0

    async def read(self, catalogue: Catalogue, user_id: str) -> tuple[np.ndarray, str, str]:
        """The user's logged photos (catalogue indexes), latest country, and a note.

        The note is empty unless the store could not answer in time (then there are no
        photos); photos this catalogue does not have are left out.
        """
        if not self.enabled or not user_id:
            return NO_PHOTOS, "", ""
        events, problem = await self.store.recent(user_id, self.limit, self.timeout_s)
        if problem:
            return NO_PHOTOS, "", f"logged conversions not used: {problem}"
        idx = [catalogue.photo_idx(e.photo_id) for e in events]
        photos = np.asarray([i for i in idx if i is not None], dtype=np.int64)
        country = next((e.country for e in events if e.country), "")
        return photos, country, ""

    async def close(self) -> None:
        if self.store is not None:
            await self.store.close()
