"""llmbook: the small package behind the book — one module per component of a decoder-only LM."""

__version__ = "0.1.0"
