"""Training: the run's sequence (fit), its policy (plan), the epoch loop, steps, state, caches, the
run folder."""
