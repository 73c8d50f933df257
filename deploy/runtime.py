"""Process settings the servers run with (`lmforge serve`, `lmforge serve --grpc`, the Bento, bench/serve_load.py).

OpenMP's default wait policy has idle intra-op threads spin for a while before they sleep. On a machine whose cores
are shared (other processes, the load generator, a second server worker) a spinning thread holds a core that the
thread it waits for needs: measured on the 2-core VM with other jobs running, the distilled classifier at batch 1
went from 19 to 493 texts/s with `OMP_WAIT_POLICY=PASSIVE` (batch 256: 386 to 413). The variable must be set before
torch is loaded, so it goes into the environment of the server process, never into a running one. A value already
in the environment wins.
"""

from __future__ import annotations

from typing import Mapping

WORKERS_ENV = "LMFORGE_WORKERS"
"""Worker processes of a server (default 1): BentoML's workers for REST, `--workers`' default for gRPC."""
SERVING_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}
"""Environment defaults of a serving process (deploy/bentofile.yaml's `envs` repeats them for the Bento)."""


def serving_env(environ: Mapping[str, str]) -> dict[str, str]:
    """`environ` with SERVING_ENV's defaults for the variables it does not set."""
    return {**SERVING_ENV, **environ}
