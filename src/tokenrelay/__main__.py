"""``python -m tokenrelay`` runs the CLI."""

from tokenrelay.cli import main

main()
