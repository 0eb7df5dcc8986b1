# The README's two commands are `make serve` and `make test`; both create .venv/ when needed.
VENV := .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: install serve test test-unit bench clean

install:
	@bash scripts/bootstrap.sh

serve: install
	$(BIN)/tritonembed serve $(ARGS)

test: install
	@bash scripts/run_tests.sh $(PYTEST_ARGS)

test-unit: install
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

bench: install
	$(BIN)/tritonembed bench $(ARGS)

clean:
	rm -rf $(VENV) .cache build *.egg-info
