"""Configuration: composing and checking the Hydra config, Hydra's errors in one line, sweeps."""
