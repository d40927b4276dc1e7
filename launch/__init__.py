"""The launcher: the ``turnout`` command and what runs before, around and after workers.

Open :mod:`turnout.launch.cli` first. Beside it, flat: ``worker`` (the entry every training
process runs, with Ray or torchrun), ``preflight`` (the checks that read the disk before
any worker starts), ``summary`` (the end-of-run lines), ``tracked_run`` (the launcher's
hold on the MLflow run), ``preempt`` (SIGTERM and Ctrl-C: a stop with a checkpoint),
``paths``, ``cli_checkpoint`` (generate / eval / export), ``export_mlflow`` (``turnout
export --mlflow``), ``keys`` and ``metrics_doc`` (the generated reference pages).

``ray/`` holds everything Ray: running a job on an embedded or joined cluster, who may
talk to that cluster (loopback and a per-run token; token authentication to join), the
driver's log printer, failure mapping and restart policy, the rendezvous backend, and
``turnout submit``.

``sweep/`` holds ``turnout sweep``: configs at fixed training-FLOP budgets as Ray Tune
trials, and the report that turns their records into the isoFLOP study.
"""
