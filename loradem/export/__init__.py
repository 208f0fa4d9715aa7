"""Exports of an assembled model to formats other runtimes read: one GGUF file for llama.cpp, Ollama and LM Studio."""
