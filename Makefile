# The two commands a new user needs: `make demo` and `make test`.
# Both create (or reuse) .venv and install the project into it; nothing else is needed.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
WORLD ?= worlds/demo

.PHONY: demo test lint venv bench-world clean

# TORCH: the wheel to install when the venv has no torch yet. 2.13.0 is a CPU build on our machines' disk;
# on a GPU box, set TORCH=torch (or install your CUDA build into .venv first).
TORCH ?= torch==2.13.0

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/specalign world build --out $(WORLD) --train 256 --test 64 --workers 2
	$(BIN)/specalign world show --dataset $(WORLD)/my_egpt_dsec_seq_1s --sample 0 --out $(WORLD)/contact_sheet.png
	@echo "--- the bundled target (sees 8 RGB frames) and draft (sees the event image) on test sample 0:"
	$(BIN)/specalign answer --model mini-target --dataset $(WORLD)/my_egpt_dsec_seq_1s --sample 0
	$(BIN)/specalign answer --model mini-draft --dataset $(WORLD)/my_egpt_dsec_seq_1s --sample 0
	@echo "--- workflow 1q: extract pairs, train a (small, CPU-sized) TokenAdapter, evaluate:"
	$(BIN)/specalign workflow 1q --train $(WORLD)/my_egpt_dsec_train_1s --test $(WORLD)/my_egpt_dsec_seq_1s \
		--out $(WORLD)/runs --epochs 8 --embed-dim 256 --num-layers 2 --lr 1e-3 --device cpu --quiet

test: $(STAMP)
	$(BIN)/ruff check specalign tests benchmarks
	$(BIN)/python -m pytest -n 2 -q

lint: $(STAMP)
	$(BIN)/ruff check specalign tests benchmarks
	$(BIN)/ruff format --check specalign tests benchmarks

bench-world: $(STAMP)
	$(BIN)/python benchmarks/world_build.py

clean:
	rm -rf $(VENV) worlds
