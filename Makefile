# imgsearch: the two README commands first, then every other entry point.
# The newest supported Python on PATH that runs (python3.13, 3.12, then 3.11; a pyenv shim of a
# version not selected does not), else python3; or PYTHON=/path/to/python.
PYTHON ?= $(or $(shell for v in 3.13 3.12 3.11; do p=$$(command -v python$$v) && $$p -c '' 2>/dev/null && { echo $$p; break; }; done),$(shell command -v python3))
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DATA := var/demo-data
DEMO_ARTIFACTS := var/artifacts
PROTO_FILES := $(shell find protos -name '*.proto')

.PHONY: run test protos lint format bench eval demo certs clean image image-test test-py313

run: $(STAMP)
	$(VENV)/bin/imgsearch demo --data $(DEMO_DATA) --artifacts $(DEMO_ARTIFACTS)

test: $(STAMP)
	$(PY) -m pytest -q

# The test install takes the optional Ray extra too, so that `make test` (and CI) run the
# Ray embedding test instead of skipping it; `pip install .` alone stays without Ray.
$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(not (3, 11) <= sys.version_info[:2] <= (3, 13))' 2>/dev/null || { echo "error: Python 3.11, 3.12 or 3.13 is required (found '$(PYTHON)'); install one of them or run 'make PYTHON=/path/to/python3.1x'"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install --quiet -e '.[dev,ray]'
	touch $(STAMP)

protos: $(STAMP)
	$(PY) -m grpc_tools.protoc -I protos --python_out=. --grpc_python_out=. --pyi_out=. $(PROTO_FILES)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports --no-cache

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

demo: $(STAMP)
	$(VENV)/bin/imgsearch demo --no-serve --data $(DEMO_DATA) --artifacts $(DEMO_ARTIFACTS)

eval: demo
	$(VENV)/bin/imgsearch eval --data $(DEMO_DATA) --json var/eval/report.json --markdown var/eval/report.md --plot var/eval/report.png

bench: demo
	$(VENV)/bin/imgsearch bench-suite --data $(DEMO_DATA) --artifacts $(DEMO_ARTIFACTS) --out var/bench

# A development CA, server/client certificates and a bearer token (never overwrites other files).
certs: $(STAMP)
	$(VENV)/bin/imgsearch certs --out var/certs

# The container image (docs/guides/container.md): podman or docker, whichever is installed.
# Minutes each, so neither is part of `make test`; .ci/run runs both with CI_IMAGE_TEST=1.
IMAGE ?= imgsearch:$(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
image:
	IMAGE=$(IMAGE) PYTHON=$(PYTHON) deploy/container/build-image.sh

image-test:
	IMAGE=$(IMAGE) deploy/container/image-test.sh

# `make test` and `make run` on Python 3.13 in a Debian 13 container, from a fresh copy of the
# tree (docs/guides/pythons.md); not part of `make test`; .ci/run runs it with CI_TEST_PY313=1.
test-py313:
	PYTHON=$(PYTHON) deploy/container/test-py313.sh

clean:
	rm -rf var
