"""Server logs as JSON lines, each carrying the request id of the RPC it was written for."""

from __future__ import annotations

import json
import logging
import os
import sys

from imgsearch.serving.request_ids import request_id_var

logger = logging.getLogger("imgsearch")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and any ``extra`` fields."""

    _standard = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update({k: v for k, v in record.__dict__.items() if k not in self._standard})
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def setup_logging(level: str = "INFO", fmt: str | None = None) -> None:
    """Configure the root logger once: JSON lines (default) or plain text on stderr."""
    fmt = fmt or os.environ.get("IMGSEARCH_LOG_FORMAT", "json")
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def _record_with_request_id(*args, **kwargs) -> logging.LogRecord:
    record = _base_record_factory(*args, **kwargs)
    rid = request_id_var.get()
    if rid:
        record.request_id = rid
    return record


# Every log record made while an RPC is handled carries its request id, whoever logs it.
_base_record_factory = logging.getLogRecordFactory()
logging.setLogRecordFactory(_record_with_request_id)
