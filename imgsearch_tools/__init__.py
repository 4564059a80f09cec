"""imgsearch tools: the command line, build, evaluation, benchmarks and demo data."""
