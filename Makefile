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

.PHONY: run test test-fast docs protos lint format bench bench-scale eval eval-suite demo certs clean lock image image-test test-py313

run: $(STAMP)
	$(VENV)/bin/imgsearch demo --data $(DEMO_DATA) --artifacts $(DEMO_ARTIFACTS)

# Every test, then the docs site built strictly (its reference pages are generated from the code).
test: $(STAMP)
	$(PY) -m pytest -q
	$(MAKE) docs

# The fast tier: unit and contract tests, without multi-process or long ones (tests/conftest.py).
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "unit and not slow"

# The docs site into var/site; --strict turns every warning (a broken link, a page left out of
# the nav) into a failure.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet

# The test install takes the optional Ray extra too, so that `make test` (and CI) run the
# Ray embedding test instead of skipping it; `pip install .` alone stays without Ray. Every
# package comes from the hash-locked requirements/dev.txt (`make lock`), then the project
# itself with no dependency of its own choosing.
$(STAMP): pyproject.toml requirements/dev.txt
	@$(PYTHON) -c 'import sys; sys.exit(not (3, 11) <= sys.version_info[:2] <= (3, 13))' 2>/dev/null || { echo "error: Python 3.11, 3.12 or 3.13 is required (found '$(PYTHON)'); install one of them or run 'make PYTHON=/path/to/python3.1x'"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install --quiet --require-hashes -r requirements/dev.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

# After a change to the dependencies in pyproject.toml (or a merge that brings one): the
# hash-locked files that `make test`, CI and the Docker build install. runtime.txt: `pip
# install '.[postgres]'`; dev.txt: with the dev and ray extras; image.txt: runtime.txt less
# torch, torchvision and their CUDA libraries (the image takes PyTorch's CPU wheels).
# Resolved for Linux x86-64 and Python 3.11 (CI's and the image's) wherever it runs, then
# checked to install as locked, from wheels, on 3.12 and 3.13 (the other supported Pythons).
COMPILE := $(VENV)/bin/uv pip compile --quiet --generate-hashes --python-version 3.11 \
	--python-platform x86_64-unknown-linux-gnu
lock: $(STAMP)
	$(COMPILE) pyproject.toml --extra postgres -o requirements/runtime.txt
	$(COMPILE) pyproject.toml --extra postgres --extra dev --extra ray -o requirements/dev.txt
	$(PY) -m imgsearch_tools.lockfiles requirements/runtime.txt requirements/image.txt
	$(PY) -m imgsearch_tools.lock_pythons requirements/dev.txt --extra postgres --extra dev \
		--extra ray --python-version 3.12 --python-version 3.13 --uv $(VENV)/bin/uv

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
	$(VENV)/bin/imgsearch eval --data $(DEMO_DATA) --json var/eval/report.json --markdown var/eval/report.md --plot docs/results/evaluation.png --results-page docs/results/evaluation.md

# The catalogues the served configuration is judged on (docs/guides/ranking-selection.md):
# three tastes sharing photos, users and queries (one CLIP set, from taste-content's images,
# serves them), the starved case (the same photos, a third of the conversions: a small
# validation slice) and the Unsplash-Lite-sized one with thin histories.
SUITE := var/eval-suite
eval-suite: $(STAMP)
	$(VENV)/bin/imgsearch demo-data $(SUITE)/taste-content --photos 5000 --users 2000 --conversions 150000 --seed 1 --taste content --quiet
	for taste in ids none; do $(VENV)/bin/imgsearch demo-data $(SUITE)/taste-$$taste --photos 5000 --users 2000 --conversions 150000 --seed 1 --taste $$taste --quiet --no-images; done
	$(VENV)/bin/imgsearch demo-data $(SUITE)/starved --photos 5000 --users 2000 --conversions 50000 --seed 1 --taste content --quiet --no-images
	$(VENV)/bin/imgsearch demo-data $(SUITE)/taste-big --photos 25000 --users 20000 --conversions 300000 --seed 1 --taste content --quiet
	$(VENV)/bin/imgsearch build --data $(SUITE)/taste-content --out $(SUITE)/taste-clip --rankers none,popularity --quiet
	$(VENV)/bin/imgsearch build --data $(SUITE)/taste-big --out $(SUITE)/taste-big-clip --rankers none,popularity --quiet
	for name in taste-content taste-ids taste-none starved; do $(VENV)/bin/imgsearch eval --data $(SUITE)/$$name --clip-artifacts $(SUITE)/taste-clip --json $(SUITE)/$$name.json --markdown $(SUITE)/$$name.md --quiet; done
	$(VENV)/bin/imgsearch eval --data $(SUITE)/taste-big --clip-artifacts $(SUITE)/taste-big-clip --json $(SUITE)/taste-big.json --markdown $(SUITE)/taste-big.md --quiet

bench: demo
	$(VENV)/bin/imgsearch bench-suite --data $(DEMO_DATA) --artifacts $(DEMO_ARTIFACTS) --out var/bench --results-page docs/results/bench.md
	$(VENV)/bin/imgsearch bench-ingest --data $(DEMO_DATA) --artifacts $(DEMO_ARTIFACTS) --out var/bench-ingest --real-clip-folder var/bench/vit-b-32 --results-page docs/results/ingest.md

# Manual, not in CI: catalogues of 10,000, 100,000 and 1,000,000 photos built and served (hours).
bench-scale: $(STAMP)
	$(VENV)/bin/imgsearch bench-scale --work var/scale --out var/bench --results-page docs/results/scale.md

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
