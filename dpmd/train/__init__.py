"""Training: `dpmd train` (config, schedule, loss, sampler, checkpoints), `dpmd freeze`, `dpmd test`."""
