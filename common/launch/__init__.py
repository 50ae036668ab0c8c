"""Launching and supervising the job's processes: the launcher's environment, each
rank's CPU budget, the watch on the launcher, the entry scripts' outer frame, Ray."""
