# initsplit — the two commands a newcomer needs are `make demo` and `make test`.
PYTHON ?= /usr/bin/python3
PYTEST_ARGS ?=

.PHONY: deps demo test bench

deps:
	tools/install-deps

demo: deps
	$(PYTHON) demo/split_demo.py

test: deps
	$(PYTHON) -m pytest -v -rfE $(PYTEST_ARGS) tests

bench: deps
	$(PYTHON) bench/split_tree.py
