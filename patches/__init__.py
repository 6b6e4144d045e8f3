"""stackpatch: version-aware patches for the Hugging Face fine-tuning stack."""

__version__ = "0.1.0"
