"""Foundation layer: errors, logging, devices, processes, files, digests and metrics.

Nothing here imports another headstart layer; every other layer may import it.
"""
