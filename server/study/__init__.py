"""`fedward study`: federated vs local-only vs centralized vs leave-one-site-out, with a report.

plan.py          the parts of a study and the variants of its federated runs
run.py           runs the parts in order into DIR (study.json), and the command line
references.py    in-process training: a site alone, all sites pooled
evaluate.py      every model on every site's test data, intervals, comparisons
progress.py      live progress and the time left
ray_session.py   one Ray session for all of a study's federations
"""
