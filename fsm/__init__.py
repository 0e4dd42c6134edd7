"""The constrained decoder: regex and JSON schema compiled to token-level automata."""
