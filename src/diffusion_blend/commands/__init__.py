"""Sub-commands of ``dblend``; each module exposes ``register(subparsers)``."""
