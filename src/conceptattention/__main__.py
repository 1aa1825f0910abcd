"""`python -m conceptattention` runs the command line."""

from .cli import main

main()
