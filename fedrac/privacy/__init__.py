"""Privacy and secure aggregation: client-level differential privacy (dp) and SecAgg+ (secagg)."""
