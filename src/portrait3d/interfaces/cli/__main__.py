"""``python -m portrait3d.interfaces.cli`` runs the command line."""

from portrait3d.interfaces.cli import main

main()
