"""The experiment layer: params schema, Typer CLI, DVC stages, MLflow tracking and reports."""
