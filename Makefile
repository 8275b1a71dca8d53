# The two commands a new user needs: `make demo` and `make test`. Both set up .venv first (idempotent).
PY := .venv/bin/python
DATA ?= data

.PHONY: setup data demo test test-fast test-shuffled bench bench-compare clean

setup:
	@bash bin/setup_env.sh

data: setup
	@bash bin/prepare_fillets.sh $(DATA)

demo: setup data  # extract + score (EER, minDCF, DET plot under exp/demo/scores)
	$(PY) -m spk_toolkit.bin.spk_inference --config conf/inference.yaml \
	    --data_dir $(DATA)/fillets_demo --output_dir exp/demo --trials $(DATA)/fillets_demo_trials.txt

# docs/testing.md: the layout, the rules, how to run one folder and how to replay a seed
# three pytest-xdist workers on two cores (much of the suite waits on subprocesses: CLI start-up, torchrun and Dask
# rendezvous, fault points), one test file each at a time (module fixtures are built once); the heaviest files first
XDIST := -n 3 --dist loadfile
# one intra-op thread per process: two xdist workers (and the CLIs they start) on two cores, never oversubscribed
# (torch's default of one thread per core in each worker made the suite ~1.6x slower, docs/testing.md)
TEST_ENV := OMP_NUM_THREADS=1 MKL_NUM_THREADS=1

test: setup data  # the whole suite, files in order (what CI runs: .ci/run)
	$(TEST_ENV) $(PY) -m pytest -q -ra -p no:randomly $(XDIST) test

test-fast: setup data  # after each step: everything but the `slow` integration tests
	$(TEST_ENV) $(PY) -m pytest -q -ra -p no:randomly $(XDIST) -m "not slow" test

test-shuffled: setup data  # the whole suite in a random order (pytest-randomly; replay: SEED=<printed seed>)
	@seed=$${SEED:-$$(od -An -N4 -tu4 /dev/urandom | tr -d ' ')}; \
	echo "test order seed $$seed (replay: make test-shuffled SEED=$$seed)"; \
	$(TEST_ENV) $(PY) -m pytest -q -ra $(XDIST) -p randomly --randomly-seed=$$seed test

bench: setup data  # the 2-core CPU command of docs/benchmarks.md (issue 2, criterion 6)
	$(PY) bench/extract_throughput.py --toolkit espnet --train_config conf/model_ecapa.yaml \
	    --batch_bins 512000 --repeats 6 --model_streams 2 --num_workers 0

bench-compare: setup data  # make bench's extraction, fe75245 (before the engine rewrite) vs this working tree (issue 14, criterion 7)
	$(PY) bench/compare_revisions.py --repeats 6

clean:
	rm -rf exp .pytest_cache
