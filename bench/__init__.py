"""fedrac's benchmark: framework overhead, Flower anchor, scale and bytes (``python -m bench``)."""
