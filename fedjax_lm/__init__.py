"""fedjax_lm: vectorized federated fine-tuning of Transformer language models in JAX."""

__version__ = "0.1.0"
