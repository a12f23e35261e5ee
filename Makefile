# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export GRADIO_ANALYTICS_ENABLED := False
export TOKENIZERS_PARALLELISM := false

CHROMIUM := /usr/bin/chromium
# a check whose means are missing (no root for the full-disk tmpfs, no Chromium) fails here instead of skipping
REQUIRE_ALL := DBLEND_REQUIRE_ALL_CHECKS=1

.PHONY: install demo test test-slow lint clean chromium

$(STAMP): pyproject.toml constraints-cpu.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints-cpu.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/dblend demo

# Debian's Chromium for tests/test_ui_browser.py (Playwright's own browser download cannot work offline); installed
# here, before the suite runs, never by a test (issue 23)
chromium:
	@test -x $(CHROMIUM) || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium \
		> /dev/null; }
	@test -x $(CHROMIUM) || { echo "make chromium: $(CHROMIUM) is missing and could not be installed" >&2; exit 1; }

# two pytest-xdist workers, a module's tests on one worker (its fixtures built once): 5.5 min against 10.5 min serial
# on the 2-core development machine, both runs while other jobs loaded it (load average 2 to 7; issue 23)
test: $(STAMP) chromium
	$(REQUIRE_ALL) $(PY) -m pytest -q -n 2 --dist loadscope

lint: $(STAMP)  # also part of `make test` (tests/test_layout.py)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/lint-imports

test-slow: $(STAMP) chromium
	$(REQUIRE_ALL) $(PY) -m pytest -q -m slow

clean:
	rm -rf $(VENV) runs results .pytest_cache
