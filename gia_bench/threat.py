"""The attacker's views of a record: how much of the worker's state an attack is given.

DESIGN.md, "Records from a training run": ``naive`` matches the decoded gradient;
``aware`` simulates the compressor with its public state (the worker's private residual
unknown); ``oracle`` also reads the private residual from the truth file: an upper
bound, not a threat, labelled as such in every table. :mod:`gia_bench.attacks.views`
builds each view's objective; study files, ``--view`` and result files name them.
Kept apart from the attacks so that a study or a report can name the views without
importing them.
"""

VIEWS = ("naive", "aware", "oracle")
