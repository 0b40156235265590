"""Flower ClientApp and the local training loop."""
