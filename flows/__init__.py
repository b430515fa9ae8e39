"""The Prefect flows: train_eval (the main job), evaluate (a registered version), promote."""

import tasks  # noqa: F401  (sets the offline Prefect / MLflow defaults before prefect is imported)
