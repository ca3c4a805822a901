"""Build-time support for the book's website (not used by the model code)."""
