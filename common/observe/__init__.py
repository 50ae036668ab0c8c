"""What a run leaves to read: timelines, TensorBoard events, metric plots, the run directory."""
