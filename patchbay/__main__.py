"""`python -m patchbay`."""

from patchbay.cli import main

main()
