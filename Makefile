# Every target sets up .venv first (scripts/setup.sh); set VENV to use another environment.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-done

.PHONY: setup browser demo test test-oldest bench lint notebooks remake docs clean

$(STAMP): pyproject.toml requirements.txt scripts/setup.sh
	bash scripts/setup.sh $(VENV)
	touch $(STAMP)

setup: $(STAMP)

## Chromium from the distribution's packages, for the browser test (skipped with a message where apt is missing).
browser:
	bash scripts/setup-browser.sh

## The main job: the paper's pipeline on the embedded refusal model, into runs/demo.
demo: $(STAMP)
	$(PY) -m refusal_helpers run --model embedded --out runs/demo

## The test suite (offline), with the browser test (tests/test_browser.py: JupyterLab in Chromium).
test: $(STAMP) browser
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

## The test suite against the oldest dependency versions pyproject.toml allows, in .venv-oldest
## (its own merged-model cache, so the embedded model is built from the GGUF with those versions too).
test-oldest:
	REQUIREMENTS=requirements-oldest.txt bash scripts/setup.sh .venv-oldest
	HF_HUB_OFFLINE=1 REFUSAL_DIRECTION_CACHE=$(CURDIR)/.venv-oldest/cache .venv-oldest/bin/python -m pytest -q

## Benchmarks: each prints its ratio or figure on its last line; the measurements go to benchmarks/results/.
bench: $(STAMP)
	$(PY) benchmarks/run_all.py --save

## Render the documents that quote measured figures (docs/, data/DATASHEET.md, benchmarks/RESULTS.md) from artifacts.
docs: $(STAMP)
	$(PY) -m refusal_helpers.report build

## The linter (rules in pyproject.toml; tests/test_structure.py runs it too).
lint: $(STAMP)
	$(PY) -m ruff check .

## Execute solutions.ipynb (saving its outputs) and rebuild exercise.ipynb from it.
notebooks: $(STAMP)
	$(PY) -m refusal_helpers.notebooks execute
	$(PY) -m refusal_helpers.notebooks build

## Remake everything downstream of the shipped adapter: preset, shipped runs, measurements, notebooks, documents
## (ADOPT=<folder>: first ship the adapter trained there; TWIN=<folder>: also seed stability against an adapter
## trained with another seed). Run again, it continues.
remake: $(STAMP)
	$(PY) scripts/remake.py $(if $(ADOPT),--adopt $(ADOPT)) $(if $(TWIN),--twin $(TWIN))

clean:
	rm -rf runs/demo .pytest_cache
