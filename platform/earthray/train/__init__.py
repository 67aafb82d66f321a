"""Training on Ray Train: one loop for every recipe, DDP or DeepSpeed ZeRO, resume, MLflow, bundles."""
