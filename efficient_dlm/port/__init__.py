"""Hugging Face import and export. Only this package knows HF tensor names."""
