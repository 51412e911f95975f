"""The bus contract: message schemas (`messages`), subject names (`subjects`), wire encoding
(`codec`) and the JetStream plumbing every process shares."""
