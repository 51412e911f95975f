"""Processes of the stack (edge, prefill, decode, the `up` supervisor) and the `grokstack` CLI."""
