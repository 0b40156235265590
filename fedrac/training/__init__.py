"""Training a model on local data: the loop every client runs and centralised pretraining uses
(optimizers, schedules, precision, devices)."""
