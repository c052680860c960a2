"""Data: tokenizers (and, with the data pipeline, sources, preparation and loading)."""
