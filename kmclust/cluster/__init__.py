"""cluster.yaml profiles and scheduler addresses → a connected ``distributed.Client``.

Why: the job code must run unchanged on a laptop (``--scheduler local``), on a
running scheduler (``--scheduler tcp://host:8786`` or ``tls://…``) and on a
cluster manager (SLURM, Kubernetes) described by a named profile. Profiles use
the dask-ctl spec style — ``module``, ``class``, ``kwargs`` of a Dask cluster
class — so switching cluster kind changes only the YAML. A profile may instead
give an ``address`` of a running scheduler with the TLS settings to reach it.

Local clusters and their dashboards bind to 127.0.0.1 unless a profile says
otherwise explicitly (which is logged as a warning).

Modules, each importing only those above it: ``messages`` (one-line error text),
``address`` (reaching a running scheduler), ``profiles`` (reading cluster.yaml),
``interrupt`` (a quiet, fast stop on Ctrl-C), ``build`` (a cluster from a profile),
``connect`` (``connect()``, the one entry point, and ``describe``).
"""
