"""batchsize-service: recommends training batch sizes from real probe trainings.

Importing this package does no work and imports nothing heavy: `service.probing` must stay importable
on a bare GPU box that has torch but not the web stack.
"""

__version__ = "0.1.0"
