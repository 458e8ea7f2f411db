# Each target sets up .venv first (a no-op once done).
.PHONY: setup train smoke test test-fast bench

setup:
	@bash infra/setup.sh

train: setup        ## the main job: the default config (embedded model, ResRL)
	.venv/bin/resrl train

smoke: setup        ## the whole flow in about a minute
	.venv/bin/resrl train --config conf/smoke.yaml

test: setup         ## the test suite (what CI runs)
	.venv/bin/python -m pytest -q

test-fast: setup    ## the quick subset while editing: no engines, flows or servers (< 1 min)
	.venv/bin/python -m pytest -q -m "not slow"

bench: setup        ## benchmarks that print figures (not tests)
	.venv/bin/python benchmarks/pipeline.py
	.venv/bin/python benchmarks/resrl_overhead.py
