"""Zero-shot segmentation evaluation: metrics (and, later, datasets, methods and the runner)."""
