# The two commands of the README:
#   make demo   set up, build the demo corpus, pretrain `micro` on it, print val perplexity + a sample
#   make test   set up, run every test (slow ones included)
PY := .venv/bin/python

.PHONY: setup demo pipeline report test test-fast bench clean-cache

setup:
	bash scripts/setup.sh

demo: setup
	$(PY) train.py stage=pretrain model=micro data=demo

pipeline: setup   # pretrain -> distill -> prune -> finetune -> report, on the demo corpus
	$(PY) train.py experiment=pipeline_demo

report: setup     # the report of the newest finished run of every stage
	$(PY) -m slimpajama.report

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

bench: setup
	$(PY) bench/throughput.py

clean-cache:
	rm -rf data/cache
