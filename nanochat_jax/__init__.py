"""nanochat-jax: train your own chat LLM in JAX/Flax."""
