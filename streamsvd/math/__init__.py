"""The numerics: input statistics and factorisation of one matrix."""
