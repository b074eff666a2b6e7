"""``qstar generate`` as a Python API: its settings, the datasets it reads, the schedule, the run (resume, commit order) and its engines (local, Ray)."""
