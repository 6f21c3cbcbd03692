"""Q-Sched: quantization-aware scheduler coefficients (wrapper, parameterisations, JAQ loss, scorers, search)."""
