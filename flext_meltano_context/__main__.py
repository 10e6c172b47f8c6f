"""`python -m flext_meltano_context` is `flext-context`."""

from flext_meltano_context.cli import main

main()
