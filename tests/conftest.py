import os

# Nothing may be fetched from a hub during tests; transformers checks this before any network call.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_MININTERVAL", "30")
# Must be set before torch loads: spinning OpenMP threads slow 2-core machines 10x when anything
# else runs (e.g. the 2-rank distributed tests, or a notebook kernel beside pytest).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
