"""``microtrain compare A.yaml B.yaml``: is recipe B really better than A?

Runs both recipes for the same seeds (or reads finished run dirs), pairs the runs by seed and reports
the mean paired difference with confidence intervals. With the same seed two recipes see the same
samples in the same batches with the same augmentation draws, so the paired differences vary far less
than the runs themselves. Split by job: ``metrics`` (what is compared and how it is read from a run dir),
``stats`` (the statistics), ``plan`` (which runs to train, reuse or resume, and what that costs),
``output`` (table, JSON, Markdown, figure), ``command`` (the command line).
"""
