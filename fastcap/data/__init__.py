"""Datasets, the shapes generator and the tokenizer."""
