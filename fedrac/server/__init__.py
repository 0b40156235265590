"""The run on the server: the ServerApp, checkpoints, results, tracking, the output folder
and the monitors (divergence, spectrum)."""
