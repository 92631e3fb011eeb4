"""Federated algorithms, one per module, each citing its paper.

FedAvgM, FedAdam, FedYogi and FedAdagrad are :func:`fedavg` with another optax server
optimizer (the config names pick it; see ``experiment.config.SERVER_OPTIMIZER_OF``).
"""

from fedjax_lite.algorithms.ditto import DittoState, DittoStateEF, ditto
from fedjax_lite.algorithms.fedavg import ServerState, ServerStateEF, fedavg, server_update
from fedjax_lite.algorithms.fednova import fednova
from fedjax_lite.algorithms.fedprox import fedprox
from fedjax_lite.algorithms.fedsgd import fedsgd
from fedjax_lite.algorithms.scaffold import ScaffoldState, ScaffoldStateEF, scaffold

__all__ = ["DittoState", "DittoStateEF", "ScaffoldState", "ScaffoldStateEF", "ServerState",
           "ServerStateEF", "ditto", "fedavg", "fednova", "fedprox", "fedsgd", "scaffold",
           "server_update"]
