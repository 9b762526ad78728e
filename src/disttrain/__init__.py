"""disttrain: a distributed training template whose gradient accumulation is exact."""
