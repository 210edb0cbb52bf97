"""nexttoken's training pipeline: `python -m train --config=... --workdir=...`."""
