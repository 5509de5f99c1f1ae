"""Tokenizer, the embedded default corpus, and the packed, sharded, resumable pipeline."""
