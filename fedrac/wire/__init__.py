"""The wire: Flower records from tensors, the byte ledger, adapter-sized downloads (delta sync)."""
