"""sealft: keep LLMs safe while they are fine-tuned, by bilevel data selection (SEAL)."""

__version__ = "0.1.0"
