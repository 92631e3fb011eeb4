"""Federated algorithms, one per module, each citing its paper."""

from fedjax_lite.algorithms.fedavg import ServerState, fedavg, server_update

__all__ = ["ServerState", "fedavg", "server_update"]
