# Two set-up commands on a fresh clone: `make demo` and `make test` (README).
# Both create .venv when missing and install the pinned environment into it.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: venv test demo demo-fmnist bench bench-gram study mutate data clean

# constraints.txt keeps torch at the local CPU wheel whatever a requirement asks for.
# The editable install's "Editable installation" note is setuptools' InformationOnly
# message (not a warning about this project); it is filtered out of pip's output.
$(STAMP): requirements-dev.txt constraints.txt pyproject.toml setup.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -r requirements-dev.txt
	PYTHONWARNINGS="ignore:Editable installation" $(PY) -m pip install -q --no-deps --no-build-isolation -e .
	@touch $(STAMP)

# The peers of the benchmarks (their adapters are tested by make test too).
BENCH_STAMP := $(VENV)/.bench-installed
$(BENCH_STAMP): $(STAMP) requirements-bench.txt constraints.txt
	$(PY) -m pip install -q -c constraints.txt -r requirements-bench.txt
	$(PY) -m pip install -q --no-deps backpack-for-pytorch==1.7.1
	@touch $(BENCH_STAMP)

venv: $(STAMP)

test: $(BENCH_STAMP)
	TRITON_INTERPRET=1 $(PY) -m pytest -q tests

# The main job on the embedded digits data: the projection figures on real gradients,
# then the unlearning comparison (all methods, 3 seeds, retain set of 64, table + plot).
demo: $(STAMP)
	$(PY) -m orthograd_fast.unlearning.demo
	$(PY) -m orthograd_fast.cli compare --data digits --forget class:3 --methods all --seeds 3 --retain-size 64

demo-fmnist: $(STAMP) data
	$(PY) -m orthograd_fast.cli unlearn --data fashion-mnist --forget class:3 --method orthograd

bench: $(BENCH_STAMP)
	$(PY) -m pytest -q -p no:cacheprovider bench/bench_projection.py --benchmark-columns=median,iqr,rounds
	$(PY) bench/bench_peers.py

# The unlearning-quality study (issue 10) -> bench/UNLEARNING.md, about 15 minutes on 2 cores.
study: $(STAMP) data
	$(PY) bench/unlearning_study.py --jobs 2

# The SampleGram table of bench/RESULTS.md (issue 3), about 5 minutes.
bench-gram: $(STAMP)
	$(PY) bench/bench_sample_gram.py --write

# Mutation testing of the core (cosmic-ray, bench/mutation.toml): each module against its
# own test files, in a snapshot of one commit (default HEAD; REV=...), so edits in the tree
# do not interfere. Hours on 2 cores for every module; pick some with MODULES, e.g.
#   make mutate MODULES="orthograd_fast/linalg.py orthograd_fast/projection.py" JOBS=2
# or estimate a module's score on a random sample of its mutants: SAMPLE=60.
# Scores and survivors: bench/results/mutation/, bench/RESULTS.md "Mutation testing".
MODULES ?=
JOBS    ?= 1
REV     ?= HEAD
SAMPLE  ?=
mutate: $(STAMP)
	$(PY) bench/mutate.py --rev $(REV) --jobs $(JOBS) $(if $(SAMPLE),--sample $(SAMPLE)) $(MODULES)

# Fashion-MNIST from Debian's package (real 60k+10k images under /usr/share/datasets).
data:
	@test -d /usr/share/datasets/fashion-mnist || apt-get install -y dataset-fashion-mnist \
		|| (apt-get update && apt-get install -y dataset-fashion-mnist) \
		|| sudo apt-get install -y dataset-fashion-mnist

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .benchmarks
