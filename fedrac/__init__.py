"""fedrac: federated fine-tuning with Fed-RAC-LoRA and baselines on Flower."""
