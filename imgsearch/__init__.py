"""imgsearch shared core: catalogue, artifacts, config, evaluation and the command line."""
