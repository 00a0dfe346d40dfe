"""LLaMA (Touvron et al. 2023) built from the layers of `parallel`."""
