"""pyrtok's evaluation harness: tasks, metrics, the ablation runner, reports."""
