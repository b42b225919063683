"""LFM2-VL vision-language models in pure JAX."""
