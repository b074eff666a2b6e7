"""Tiny random Llama-style models with an offline tokenizer, for tests and benchmarks."""
