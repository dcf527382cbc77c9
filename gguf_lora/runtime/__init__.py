"""Clients for what serves the files: llama-server (hot-swapped adapters) and Ollama (deploy)."""
