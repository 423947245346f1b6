"""llama4-local: run Meta's Llama 4 on one workstation."""

__version__ = "0.1.0"
