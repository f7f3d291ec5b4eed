"""Training: state, step, sharding rules, checkpoints, metrics, validation and the loop.

Submodules are imported directly (`from dig_jax.train.loop import train`), so that tools which
only need the step (benchmarks) do not load the data pipeline and checkpointing.
"""
