"""Training: the data pipeline (``sparseek.train.data``) and, as they land, the trainer."""
