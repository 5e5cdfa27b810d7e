"""The commands behind the CLI: launch, pool, SLURM submission, confirm, dry run, delete,
status. Each is a plain function the CLI (and ``import sweep``) calls."""
