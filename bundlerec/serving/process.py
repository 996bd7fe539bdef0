"""What a replica sets up in its own process: the bundle threads' priority and the bind address of
Ray Serve's internal gRPC server."""

import os
import threading


def lower_this_threads_priority(nice: int = 19) -> None:
    """Raise the calling thread's nice value (Linux: per thread; needs no privilege): the bundle
    pool's threads, so that the replica's event loop, which answers recommendations, gets the CPU first."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    except (AttributeError, OSError):  # not Linux, or not allowed: keep the default priority
        pass


def bind_internal_grpc_to_node_ip() -> None:
    """Ray Serve 2.60 starts an inter-deployment gRPC server in every replica on ``[::]:0``, i.e. on
    every interface of the machine, although nothing uses it unless RAY_SERVE_USE_GRPC_BY_DEFAULT=1
    (found by listing the demo's sockets: tests/test_registry_serve.py). Called in the replica's
    constructor, which Serve runs before it starts that server: bind it to this node's own address
    (127.0.0.1 on one machine) instead. A Ray without this hook is left as it is."""
    import ray
    from ray.serve._private import replica as serve_replica

    original = getattr(serve_replica, "add_port_to_grpc_server", None)
    if original is None or getattr(original, "bundlerec_bound", False):
        return
    ip = ray.util.get_node_ip_address()

    def bind(server, address: str):
        if address.startswith("[::]:"):
            address = f"{f'[{ip}]' if ':' in ip else ip}:{address.rsplit(':', 1)[1]}"
        return original(server, address)

    bind.bundlerec_bound = True
    serve_replica.add_port_to_grpc_server = bind
