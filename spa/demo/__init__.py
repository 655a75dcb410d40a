"""The offline demo world: verifiable-constraint prompts, an oracle, a tiny pi_init, ``spa demo``."""
