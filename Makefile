# `make demo` and `make test` are all a fresh machine needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

.PHONY: demo test lint bench models pictures clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $@

$(TEST_STAMP): pyproject.toml $(STAMP)
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

demo: $(STAMP)
	@echo '$$ derivcli info sample_models/square_relu.keras'
	@$(BIN)/derivcli info sample_models/square_relu.keras
	@echo
	@echo '$$ derivcli deriv sample_models/square_tanh.keras --grid -1:1:5 --partial x --partial x^2 --format table'
	@$(BIN)/derivcli deriv sample_models/square_tanh.keras --grid -1:1:5 --partial x --partial x^2 --format table
	@echo
	@echo '$$ derivcli grad sample_models/shifted_square.h5 --at 0.5'
	@$(BIN)/derivcli grad sample_models/shifted_square.h5 --at 0.5
	@echo
	@echo '$$ python sample_models/train_heat_pinn.py --output .venv/heat_pinn.keras   # its loss by derivcli.operator'
	@$(BIN)/python sample_models/train_heat_pinn.py --output $(VENV)/heat_pinn.keras
	@echo
	@echo '$$ derivcli op .venv/heat_pinn.keras --output-names u --grid t=0:1:101 --grid x=-1:1:201 --expr "res=u_t - 0.1*u_xx" --summary --max-abs 0.2 --format table'
	@$(BIN)/derivcli op $(VENV)/heat_pinn.keras --output-names u --grid t=0:1:101 --grid x=-1:1:201 \
	    --expr "res=u_t - 0.1*u_xx" --summary --max-abs 0.2 --format table

test: $(TEST_STAMP)
	$(BIN)/python -m pytest -q

lint: $(TEST_STAMP)
	$(BIN)/ruff check derivcli tests bench sample_models

bench: $(STAMP)
	$(BIN)/pip install --quiet -e '.[bench]'
	$(BIN)/python bench/bench_jax.py
	$(BIN)/python bench/bench_derivatives.py
	$(BIN)/python bench/bench_mixed.py
	$(BIN)/python bench/bench_io.py
	$(BIN)/python bench/bench_shards.py
	$(BIN)/python bench/bench_images.py
	$(BIN)/python bench/bench_attribution.py
	$(BIN)/python bench/bench_applications.py

# The README's pictures, from the sample models (committed under docs/).
pictures: $(STAMP)
	$(BIN)/derivcli deriv sample_models/square_relu.keras --grid -1:1:401 -p x -p x^2 -q -o docs/relu.npz
	$(BIN)/derivcli deriv sample_models/square_tanh.keras --grid -1:1:401 -p x -p x^2 -q -o docs/tanh.npz
	$(BIN)/derivcli plot docs/relu.npz docs/tanh.npz -o docs/relu_vs_tanh.png
	$(BIN)/derivcli op sample_models/heat_pinn.keras --output-names u --grid t=0:1:101 --grid x=-1:1:201 \
	    --expr "res=u_t - 0.1*u_xx" --max-abs 0.2 -q -o docs/.residual.npz --plot docs/heat_residual.png
	$(BIN)/derivcli attribute sample_models/bars_cnn.keras --npz sample_models/bars.npz --target label --logits \
	    -q -o docs/.attributions.npz --plot docs/bars_attribution.png
	rm -f docs/relu.npz docs/tanh.npz docs/.residual.npz docs/.attributions.npz

models: $(TEST_STAMP)
	$(BIN)/python sample_models/build_models.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
