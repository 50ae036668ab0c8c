"""The training core: the run's settings, the epoch/step loop, the runner contracts, errors,
learning-rate schedules, metrics and the progress bar."""
