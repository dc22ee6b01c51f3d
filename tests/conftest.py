import os

# Nothing may be fetched from a hub during tests; transformers checks this before any network call.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_MININTERVAL", "30")
