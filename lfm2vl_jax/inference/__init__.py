"""Generation: the decoding cache, sampling, and the engine (jitted prefill, donated decode step, host and
device loops, bucketing)."""
