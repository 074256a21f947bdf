"""`rmm merge --ray-address`: one merge's modules spread over the nodes of a Ray cluster.

`rmm.merge.merge` makes two passes over the modules through a `rmm.merge.ModuleMap`: each module's error curves
(method auto), then, once it has allocated the budget itself, each module's solve; it writes the results in module
order as they come back. `ClusterMap` is such a map over one actor per node (per GPU, on CUDA): map (curves on the
actors), reduce (the allocation on the driver), map (solves on the actors), and the bundle is the local merge's.
Actors read the adapters' files where they run, at the paths the driver opened: the files must be at the same
paths on every node (a shared file system).
"""

from __future__ import annotations

from collections import deque

import ray
import torch

from rmm.device import bound_heap, to_cpu, workers
from rmm.errors import RMMError
from workers.site import _get, actor_device, node_slots, on_node, on_slot


class ModuleWorker:
    """One node's share of a merge: runs the per-module function the driver sends, one module per thread."""

    def __init__(self, device: str):
        self.device = torch.device(device)
        bound_heap()
        if self.device.type == "cpu":
            torch.set_num_threads(1)  # one intra-op thread per module, as a local merge's threads: the same bits
        self.node = ray.get_runtime_context().get_node_id()
        self.functions: dict = {}

    def threads(self) -> int:
        """Modules this actor computes at once, as a local merge would on this node (`rmm.device.workers`)."""
        on_node(self.device)  # the actor's first call
        return workers(self.device)

    def run(self, fn: list, mod) -> tuple[str, object]:
        """(this node's id, `fn`'s results for module `mod`). `fn` is [the pass's function put in the object store]:
        in a list, Ray hands over the reference, so the function (every adapter's metadata) is unpickled here once per
        pass, not once per module."""
        ref = fn[0]
        if ref not in self.functions:
            self.functions[ref] = ray.get(ref)
        return self.node, to_cpu(self.functions[ref](mod, self.device))


class ClusterMap:
    """A `rmm.merge.ModuleMap` over the cluster this process is connected to, computing on `device` (auto|cpu|cuda;
    auto: CUDA when the cluster has GPUs, whatever the driver has: a CPU head node merges on its GPU workers).
    `passes` records, per pass, the node each module was computed on."""

    def __init__(self, device: str = "auto"):
        self.device = device
        self.computed_on: str | None = None  # the device resolved against the cluster, once started
        self.actors: list = []
        self.slots: list = []  # an actor once per module it computes at once: module i goes to slot i mod len
        self.passes: list[dict[str, str]] = []

    def __enter__(self) -> ClusterMap:
        return self

    def __exit__(self, *exc) -> None:
        for actor in self.actors:
            ray.kill(actor)

    def __call__(self, fn, modules, device: torch.device):
        """`device` (the driver's) is not used: the actors compute on the cluster's (`ClusterMap.device`)."""
        if not self.actors:
            self._start()
        fn = [ray.put(fn)]  # sent once, not with every module (`ModuleWorker.run`)
        placed: dict[str, str] = {}
        self.passes.append(placed)
        pending: deque = deque()
        for i, mod in enumerate(modules):
            pending.append((mod.name, self.slots[i % len(self.slots)].run.remote(fn, mod)))
            if len(pending) > len(self.slots):  # a few modules per thread in flight: memory stays bounded
                yield self._take(pending, placed)
        while pending:
            yield self._take(pending, placed)

    def record(self) -> dict:
        nodes = len({node for placed in self.passes for node in placed.values()})
        return {"nodes": nodes, "device": self.computed_on, "passes": self.passes}

    def _start(self) -> None:
        device = self.computed_on = actor_device(self.device, int(ray.cluster_resources().get("GPU", 0)))
        gpu = device == "cuda"
        slots = node_slots("GPU" if gpu else "CPU", each=gpu)  # one actor per GPU, else per node
        if not slots:
            raise RMMError(f"the Ray cluster has no live node with a {'GPU' if gpu else 'CPU'} to merge on")
        cores = {n["NodeID"]: max(1, int(n["Resources"].get("CPU", 1))) for n in ray.nodes()}
        Worker = ray.remote(num_cpus=0 if gpu else 1, num_gpus=1 if gpu else 0)(ModuleWorker)
        self.actors = [
            Worker.options(max_concurrency=cores[node], scheduling_strategy=on_slot(slots, i)).remote(device)
            for i, node in enumerate(slots)
        ]
        threads = [min(n, cores[node]) for n, node in zip(_get([a.threads.remote() for a in self.actors]), slots)]
        # Interleaved, so that consecutive modules go to different actors.
        self.slots = [a for k in range(max(threads)) for a, n in zip(self.actors, threads) if k < n]

    @staticmethod
    def _take(pending: deque, placed: dict[str, str]):
        name, ref = pending.popleft()
        placed[name], result = _get([ref])[0]
        return result
