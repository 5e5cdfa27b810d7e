"""Orchestration: the stores (storage, tracking), one trial (objective), the study loop
(worker), and the ways to launch workers (launch, pool, slurm) and inspect them (status).
Imports training and the study language, never the views."""
