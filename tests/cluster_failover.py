"""Run by test_train.py in its own process: pretraining on a multi-node Ray cluster on this
machine, where a node holding a training worker is removed mid-run (and a new node joins,
as an autoscaler would add one). Prints the outcome as JSON on the last line.

The test gives this process a Ray temp dir of its own (``RAY_TMPDIR``): the cluster records its
head's address there, and no later ``ray.init()`` on this machine can find the dead head.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import ray
from ray.cluster_utils import Cluster

from earthray.train.run import pretrain
from train_helpers import RecordRegisteredCheckpoints, metric_steps, registered_steps, tiny_spec


def main(root: str, workdir: str) -> None:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        run(cluster, root, workdir)
    finally:
        ray.shutdown()
        cluster.shutdown()


def run(cluster: Cluster, root: str, workdir: str) -> None:
    # One "trainer" per worker node and per Train worker: each of these nodes holds one of the two workers.
    nodes = [cluster.add_node(num_cpus=1, resources={"trainer": 1}) for _ in range(2)]
    ray.init(address=cluster.address)
    spec = tiny_spec(root, Path(workdir), "node-loss", max_steps=40, checkpoint_every=5, max_failures=3,
                     workers={"num_workers": 2, "cpus_per_worker": 0.5, "resources": {"trainer": 1}})
    registered = Path(workdir) / "registered-steps"
    outcome: dict = {}
    thread = threading.Thread(target=lambda: outcome.update(
        result=pretrain(spec, callbacks=[RecordRegisteredCheckpoints(registered)])), daemon=True)
    thread.start()
    deadline = time.time() + 300
    while not registered_steps(registered) and time.time() < deadline and thread.is_alive():
        time.sleep(0.1)
    alive_before = thread.is_alive()
    cluster.remove_node(nodes[0])
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
