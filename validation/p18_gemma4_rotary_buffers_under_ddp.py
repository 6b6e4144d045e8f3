"""P18: a tiny Gemma 4 wrapped in DistributedDataParallel by two CPU processes (gloo).

Each rank builds the model and keeps its own rotary inv_freq buffers, computed from the config;
then DDP broadcasts rank 0's buffers to rank 1, as it does before training. The two ranks run
with hash seeds under which Python iterates the set of attention types in different orders
(the probe below finds such a pair; it does not depend on the patch). Exit 1 when rank 1's
buffers after the broadcast differ from the ones it computed (the buffers were registered in
another order than rank 0's and the broadcast cut them up wrongly), 0 when they are equal.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

from tiny_gemma4 import TEXT, bug, fine

WORKER = "--worker"
RANKS = 2


def set_order(hash_seed: int) -> list[str]:
    """The order a fresh interpreter with `hash_seed` iterates the set of layer types in."""
    probe = f"print(*set({TEXT['layer_types']!r}))"
    environ = {**os.environ, "PYTHONHASHSEED": str(hash_seed)}
    completed = subprocess.run(
        [sys.executable, "-S", "-c", probe], capture_output=True, text=True, env=environ
    )
    return completed.stdout.split()


def seeds_with_different_orders() -> tuple[int, int]:
    first = set_order(0)
    for seed in range(1, 64):
        if set_order(seed) != first:
            return 0, seed
    raise SystemExit("inconclusive: no hash seed below 64 changes the order of the layer types")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def worker() -> None:
    """One rank: wrap the model in DDP and report the rotary buffers that changed."""
    import torch
    import torch.distributed as dist
    from tiny_gemma4 import text_config
    from transformers import Gemma4ForCausalLM

    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = Gemma4ForCausalLM(text_config())
    rotary = model.model.rotary_emb
    own = {n: b.clone() for n, b in rotary.named_buffers() if n.endswith("inv_freq")}
    torch.nn.parallel.DistributedDataParallel(model)
    changed = [n for n, b in rotary.named_buffers() if n in own and not torch.equal(b, own[n])]
    print(json.dumps({"order": list(own), "changed": changed}))
    dist.destroy_process_group()


def main() -> None:
    seeds = seeds_with_different_orders()
    port = free_port()
    workers = []
    for rank, seed in enumerate(seeds):
        environ = {
            **os.environ,
            "PYTHONHASHSEED": str(seed),
            "RANK": str(rank),
            "WORLD_SIZE": str(RANKS),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
        workers.append(
            subprocess.Popen(
                [sys.executable, __file__, WORKER],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=environ,
            )
        )
    reports = []
    for rank, process in enumerate(workers):
        out, err = process.communicate(timeout=600)
        if process.returncode != 0:
            tail = " ".join(err.strip().splitlines()[-1:])
            raise SystemExit(f"inconclusive: rank {rank} exited {process.returncode}: {tail}")
        reports.append(json.loads(out.strip().splitlines()[-1]))
    changed = reports[1]["changed"]
    if changed:
        first = [report["order"][0].removesuffix("_inv_freq") for report in reports]
        bug(
            RuntimeError(
                f"DDP's broadcast changed {len(changed)} of rank 1's {len(reports[1]['order'])} "
                f"rotary buffers ({', '.join(changed)}): rank 0 registered {first[0]} first, "
                f"rank 1 {first[1]}"
            )
        )
    fine(
        f"rank 1's {len(reports[1]['order'])} rotary buffers unchanged by DDP's broadcast "
        f"(hash seeds {seeds[0]} and {seeds[1]})"
    )


if __name__ == "__main__":
    worker() if WORKER in sys.argv else main()
