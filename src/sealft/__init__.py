"""sealft: keep LLMs safe while they are fine-tuned, by bilevel data selection (SEAL)."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy, so that `sealft --help` does not import numpy / torch.
    if name == "SealSelector":
        from sealft.api import SealSelector

        return SealSelector
    raise AttributeError(f"module 'sealft' has no attribute {name!r}")
