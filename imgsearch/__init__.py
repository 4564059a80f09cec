"""imgsearch foundation: catalogue, artifacts, config, serving runtime, protocol and API."""
