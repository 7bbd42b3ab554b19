# The README's commands. `make test` is the one test command: it installs the system packages the
# tests need when they are missing (Debian's headless Chromium for the report test, Orthanc as the PACS), makes the OS
# users the deployment tests run sites as (server/isolation.py), then runs the whole suite.
# Needs root for the system part (as CI has); as another user it uses sudo.

PYTHON ?= python3.11
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# The real MedMNIST files live beside the project; the tests fail loudly without them.
FEDWARD_DATA ?= $(abspath $(CURDIR)/../shared/data)
export FEDWARD_DATA

.PHONY: install test test-fast system-deps

install:
	$(PYTHON) -m pip install -e ".[test]"

# Two pytest workers (pytest-xdist), each test file on one of them and each worker on its own cores
# (tests/conftest.py); TEST_WORKERS=0 runs the tests one after another in one process.
TEST_WORKERS ?= 2

test: system-deps
	$(PYTHON) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

test-fast: system-deps
	$(PYTHON) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder -m "not slow" $(PYTEST_ARGS)

system-deps:
	@command -v chromium >/dev/null 2>&1 || { \
	  echo "installing Debian's chromium (the report test renders report.html headless)"; \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium >/dev/null; }
	@{ command -v Orthanc >/dev/null 2>&1 || [ -x /usr/sbin/Orthanc ]; } && \
	  [ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || { \
	  echo "installing Debian's orthanc and orthanc-dicomweb (the real PACS of tests/e2e/test_pacs.py)"; \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq orthanc orthanc-dicomweb >/dev/null; }
	@$(SUDO) $(PYTHON) -m server.isolation
