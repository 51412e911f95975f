"""KV cache blocks in Redis: content-addressed keys (`keys`), the store (`block_store`), the
vLLM v1 KV connector that moves blocks between an engine and Redis (`connector`), the typed
records that cross to the workers (`records`), and the Redis ACL rule of the stack's user (`acl`).
Every block in Redis carries an integrity tag made with the stack secret (`block_store`)."""
