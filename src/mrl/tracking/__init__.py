"""Experiment tracking: W&B run setup, accuracy-vs-size charts and the job's result files."""
