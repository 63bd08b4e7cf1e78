# The two commands of the README: `make run` (set-up + main job) and `make test` (set-up + whole test suite).
.PHONY: setup run test export docs bench clean-docs

setup:
	@bash tools/setup.sh

# The main job: train the default recipe through stages 1, 1.5 and 2 and evaluate it (report: runs/default/report.md).
# --resume: a second `make run` continues an interrupted run, or only rewrites the report of a finished one.
run: setup
	.venv/bin/mmlit run --out runs/default --resume

test: setup
	@bash tools/test.sh

# After editing notebooks: export the package, clean the notebooks, regenerate the README.
export: setup
	.venv/bin/nbdev_export && .venv/bin/nbdev_clean && .venv/bin/python tools/build_readme.py

docs: setup
	.venv/bin/python tools/build_docs.py docs

# Benchmarks against transformers' fast (torchvision) image processor need a separate environment.
bench: setup
	bash tools/bench_env.sh
	.venv-bench/bin/python -m mmlit.bench
