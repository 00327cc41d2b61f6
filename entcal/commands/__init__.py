"""CLI sub-commands: each module registers one command (see ``entcal.cli``)."""
