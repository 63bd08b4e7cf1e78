# The two commands of the README: `make run` (set-up + main job) and `make test` (set-up + whole test suite).
.PHONY: setup run test export docs bench clean-docs

setup:
	@bash tools/setup.sh

run: setup
	.venv/bin/mmlit tile --out artifacts/tiles.png

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
