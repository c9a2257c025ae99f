"""What a run needs around the model: run directories and resume, loggers (W&B), the SLURM environment,
the config resolvers, and the one all-or-nothing file write every checkpoint, card and table goes through."""
