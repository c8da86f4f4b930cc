"""Training: typed config, Ray Data feeding, DeepSpeed engine + EMA per worker, MLflow, checkpoints, publish."""
