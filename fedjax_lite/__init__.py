"""fedjax_lite: accelerator-first federated learning simulation in JAX.

Layers (imports point one way): ``data`` (host, NumPy) -> ``models``/``core``/
``algorithms`` (device, JAX) -> ``experiment`` (config, runner, CLI).
"""

__version__ = "0.1.0"
