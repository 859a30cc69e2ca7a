# Naive to Fast — the two commands: `make book` (build the site) and `make test` (the whole suite).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-lock
STUDENT_DIR ?= dist/student
OTTER_DIR ?= dist/otter
PORT ?= 8000
# The lock pins torch==2.13.0.  On this project's machines pip finds its CPU wheel on local disk; from
# the default index elsewhere it is the (multi-GB) CUDA build.  For the CPU build on any machine:
#   make setup TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
PIP := $(PY) -m pip install --disable-pip-version-check -q $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX))

.PHONY: setup book test test-fast lint browser student otter serve notebooks bench clean
MATHJAX := _build/static/mathjax/tex-chtml.js

$(STAMP): lib/requirements-lock.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) -r lib/requirements-lock.txt
	$(PIP) --no-deps -e .
	touch $@

setup: $(STAMP) $(MATHJAX)  ## create .venv with the pinned dependencies and the library (editable)

$(MATHJAX):  ## MathJax 3 from the npm registry, served by the site itself (math renders offline)
	rm -rf _build/mathjax-pkg _build/static/mathjax && mkdir -p _build/mathjax-pkg _build/static
	cd _build/mathjax-pkg && npm pack mathjax@3.2.2 --silent >/dev/null && tar xzf mathjax-3.2.2.tgz
	# why only these: tex-chtml.js is the whole renderer; it loads its fonts, TeX extensions
	# (autoload) and menu (ui, a11y, sre) from beside it -- 7 of MathJax's 24 MB
	cd _build/mathjax-pkg/package/es5 && mkdir -p ../../../static/mathjax/output/chtml ../../../static/mathjax/input/tex \
	  && cp tex-chtml.js ../../../static/mathjax/ && cp -r output/chtml/fonts ../../../static/mathjax/output/chtml/ \
	  && cp -r input/tex/extensions ../../../static/mathjax/input/tex/ && cp -r ui a11y sre ../../../static/mathjax/
	rm -rf _build/mathjax-pkg

book: setup  ## build the site, executing every chapter in the cpu profile (cached)
	EFFDL_PROFILE=cpu EFFDL_SITE_BUILD=1 $(VENV)/bin/jupyter-book build . -W -n --keep-going
	@echo "site: $(CURDIR)/_build/html/index.html"

test: setup lint browser  ## lint, library tests, notebooks (nbmake, smoke profile), pairing check, book build, grader
	EFFDL_PROFILE=smoke $(PY) -m pytest tests --nbmake notebooks --nbmake-timeout=600 -p no:cacheprovider

browser:  ## Debian's chromium, for the test that opens the built site with the network blocked
	@command -v chromium >/dev/null 2>&1 || (timeout 600 apt-get update -qq && timeout 600 apt-get install -y -qq chromium >/dev/null) \
	  || echo "chromium could not be installed here: the offline-site test will be skipped"

test-fast: setup  ## the edit-test loop: library tests only (no notebooks, no Triton interpreter, no book build)
	EFFDL_PROFILE=smoke $(PY) -m pytest tests -m "not slow and not interpreter" -q -p no:cacheprovider

lint: setup  ## ruff (lint, import order) over lib/, tests/, .ci/; the publishing workflow against its schema
	$(VENV)/bin/ruff check lib tests .ci
	$(VENV)/bin/check-jsonschema --builtin-schema vendor.github-workflows .github/workflows/*.yml

student: setup  ## student notebooks (solutions removed) into $(STUDENT_DIR)
	$(PY) -m effdl.student notebooks --out $(STUDENT_DIR)

otter: setup  ## Otter-Grader: per chapter a master notebook, then otter assign (student notebook, autograder zip)
	$(PY) -m effdl.export otter $(OTTER_DIR)
	for d in $(OTTER_DIR)/*/; do c=$$(basename $$d); \
	  (cd $$d && $(abspath $(VENV))/bin/otter assign --no-pdfs $$c.ipynb dist) || exit 1; done
	@echo "Otter: $(OTTER_DIR)/<chapter>/dist/{student,autograder}"

serve:  ## serve the built site on http://localhost:$(PORT)
	@test -f _build/html/index.html || { echo "no site yet: run 'make book' first"; exit 1; }
	$(PY) -m http.server $(PORT) --directory _build/html

notebooks: setup  ## regenerate notebooks/*.ipynb (and Colab links) from book/*.md
	$(PY) .ci/sync_notebooks.py

bench: setup  ## every chapter's benchmark in the cpu profile, JSON into _build/bench
	cs=$$($(PY) -m effdl.bench --list) || exit 1; \
	for c in $$cs; do EFFDL_PROFILE=cpu $(PY) -m effdl.bench $$c --json _build/bench/$$c-cpu.json || exit 1; done

clean:
	rm -rf _build dist
