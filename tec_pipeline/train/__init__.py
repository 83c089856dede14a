"""Stage two's library wing: what a training run reads and how it is ordered, resumed and logged.

`order` (epoch plan, view choice, mask noise), `spec` (what a cache or base can serve),
`batches` (cached and online batch makers), `pipeline` (the run's data and model arguments
from its config), `schedule` (Tab. 8), `checkpoint` (state, resume, identity, initialisation),
`log` (records and meters), `ablations` (Tab. 6 rows as overrides). The loop itself is the
driver `stages/train.py`.
"""
