"""`python -m pipeline ...`: the same CLI, so `torchrun -m pipeline train ...` can start it."""

from pipeline.cli import main

main()
