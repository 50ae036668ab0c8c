"""Who does what, and the drivers that make it happen: the plan (dp x pp), pipeline
schedules, the pipeline, parameter-server and data-parallel drivers, MPI point-to-point.
plan and schedule are pure; the others drive MPI."""
