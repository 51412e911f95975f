"""The engine interface over vLLM, and the prefill and decode pool workers built on it."""
