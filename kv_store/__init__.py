"""KV cache blocks in Redis: content-addressed keys (`keys`), the store (`block_store`), the
vLLM v1 KV connector that moves blocks between an engine and Redis (`connector`), and the typed
records that cross to the workers (`records`)."""
