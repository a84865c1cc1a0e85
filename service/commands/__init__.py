"""The ``advsentry`` subcommands; each module exposes ``register(app)``."""
