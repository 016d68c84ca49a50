"""One module per contender; each runs as its own process and prints a ``bench.child`` report.

A contender is a module with a ``main()`` run as ``python -m
bench.contenders.<module>``. Running each in a fresh process keeps their peak
RSS apart and stops one contender's warm caches, threads or leaked memory
from helping or hurting the next.
"""
