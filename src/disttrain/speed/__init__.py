"""Speed features that leave the update alone: compilation, activation checkpointing, profiling, FLOP counts.

One concern per module; the trainer composes them. None changes what a step computes beyond float
rounding (compilation fuses and reorders operations; see README, "Speed").
"""
