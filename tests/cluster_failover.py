"""Run by test_train.py in its own process: pretraining on a multi-node Ray cluster on this
machine, where a node holding a training worker is removed mid-run (and a new node joins,
as an autoscaler would add one). Prints the outcome as JSON on the last line."""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import ray
from ray._common.utils import reset_ray_address
from ray._private.utils import read_ray_address
from ray.cluster_utils import Cluster

from earthray.train.run import pretrain
from train_helpers import metric_steps, registered_checkpoint_steps, tiny_spec


def main(root: str, workdir: str) -> None:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        run(cluster, root, workdir)
    finally:
        ray.shutdown()
        cluster.shutdown()
        # Cluster records its head as this machine's current Ray (/tmp/ray/ray_current_cluster) and
        # leaves the record behind; a later bare ray.init() would try to join the dead head.
        if read_ray_address() == cluster.address:
            reset_ray_address()


def run(cluster: Cluster, root: str, workdir: str) -> None:
    nodes = [cluster.add_node(num_cpus=1, resources={"trainer": 1}) for _ in range(2)]
    ray.init(address=cluster.address)
    spec = tiny_spec(root, Path(workdir), "node-loss", max_steps=40, checkpoint_every=5, max_failures=3,
                     workers={"num_workers": 2, "cpus_per_worker": 0.5, "resources": {"trainer": 1}})
    outcome: dict = {}
    thread = threading.Thread(target=lambda: outcome.update(result=pretrain(spec)), daemon=True)
    thread.start()
    deadline = time.time() + 300
    while not registered_checkpoint_steps(spec) and time.time() < deadline and thread.is_alive():
        time.sleep(0.1)
    from ray._private import state  # the GCS view of this cluster (the state API may pick another Ray)

    hosts = {a["Address"]["NodeID"] for a in state.actors().values()
             if a["ActorClassName"] == "RayTrainWorker" and a["State"] == "ALIVE"}
    victim = next(n for n in nodes if n.node_id in hosts)
    alive_before = thread.is_alive()
    cluster.remove_node(victim)
    cluster.add_node(num_cpus=1, resources={"trainer": 1})
    thread.join(timeout=600)
    result = outcome["result"]
    print(json.dumps({
        "alive_when_removed": alive_before,
        "step": result.metrics["step"],
        "resumed": metric_steps(result.tracking_uri, result.run_id, "resumed_from_step"),
        "steps": metric_steps(result.tracking_uri, result.run_id, "loss"),
    }))


if __name__ == "__main__":
    main(*sys.argv[1:3])
