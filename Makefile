# The two commands of the README:
#   make demo   set up, then the whole pipeline on the demo corpus (pretrain -> distill -> prune ->
#               finetune -> evaluate -> generate) and its report
#   make test   set up, lint, run every test (slow ones included)
PY := .venv/bin/python

.PHONY: setup demo pipeline pretrain report lint test test-fast bench clean-cache

setup:
	bash scripts/setup.sh

demo: pipeline

pipeline: setup   # pretrain -> distill -> prune -> finetune -> report, on the demo corpus
	$(PY) train.py experiment=pipeline_demo

pretrain: setup   # the pretrain stage alone: `micro` on the demo corpus, 800 steps
	$(PY) train.py stage=pretrain model=micro data=demo

report: setup     # the report of the newest finished run of every stage
	$(PY) -m slimpajama.report

lint: setup      # ruff, with the rules pyproject.toml selects
	.venv/bin/ruff check .

test: setup lint
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

bench: setup
	$(PY) bench/throughput.py

clean-cache:
	rm -rf data/cache
