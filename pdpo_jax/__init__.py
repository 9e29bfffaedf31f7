"""pdpo_jax: persona-consistent dialogue via pseudo-preference tuning, in pure JAX."""

__version__ = "0.1.0"
