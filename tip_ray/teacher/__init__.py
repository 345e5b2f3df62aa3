"""The teacher scoring pool: top-K log-probs for every response position."""
