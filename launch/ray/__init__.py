"""Everything Ray: run a job on an embedded or joined cluster, and submit one.

``run.run_ray`` trains a validated config on Ray Train; ``cluster`` joins a running
cluster (address, reachability); ``submit`` hands the job to a cluster's job server.
``logs`` (the driver's printer), ``failures`` (one line per failed job), ``restarts``
(which failures Ray may restart) and ``backend`` (the rendezvous-only torch backend) are
its own.
"""

__all__ = ["cluster", "run", "submit"]
