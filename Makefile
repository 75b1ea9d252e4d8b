# The two commands of the README:
#   make quickstart   set up .venv (if not current) and run the main job
#   make test         set up .venv (if not current) and run the test suite
PYTHON ?= python3
VENV   ?= .venv
STAMP  := $(VENV)/.installed

.PHONY: quickstart test setup clean-venv

setup: $(STAMP)

# Reinstall only when what we install changed: a second `make test` starts in seconds. --no-compile: byte-compiling
# all of torch takes about a minute of set-up; Python compiles only what is imported, on first import.
$(STAMP): pyproject.toml constraints-cpu.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q --no-compile -c constraints-cpu.txt -e '.[test]'
	touch $(STAMP)

quickstart: $(STAMP)
	$(VENV)/bin/diffdistill quickstart

test: $(STAMP)
	OMP_NUM_THREADS=1 $(VENV)/bin/python -m pytest tests -n 2 --dist loadfile --no-loadscope-reorder -p no:cacheprovider --durations=15

clean-venv:
	rm -rf $(VENV)
