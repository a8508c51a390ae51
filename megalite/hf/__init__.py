"""Hugging Face interop: parameter names (names.py), export (export.py), import
(importer.py) and the tokenizer.json conversion (tokenizer.py)."""
