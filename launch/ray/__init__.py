"""Everything Ray: run a job on an embedded or joined cluster, and submit one.

``run.run_ray`` trains a validated config on Ray Train; ``cluster`` joins a running
cluster (address, reachability); ``auth`` says who may talk to the cluster (an embedded
one on loopback with a token of the run's own; token authentication required to join
or submit); ``submit`` hands the job to a cluster's job server.
``logs`` (the driver's printer), ``failures`` (one line per failed job), ``restarts``
(which failures Ray may restart) and ``backend`` (the rendezvous-only torch backend) are
its own.
"""

__all__ = ["auth", "cluster", "run", "submit"]
