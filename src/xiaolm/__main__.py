"""`python -m xiaolm` runs the CLI."""

from xiaolm.cli import main

main()
