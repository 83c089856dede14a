"""Stage two's library wing: what a training run reads and how it is ordered, resumed and logged.

`order` (epoch plan, view choice, mask noise), `spec` (what a cache or base can serve), `shards`,
`images`, `batches` (cached and online batch makers), `loader`, `data` (a run's targets and views
from its config), `model` (the new model from its config, the step's graph), `interfaces`,
`schedule` (Tab. 8), `checkpoint` (state, resume, identity, initialisation), `log` (records and
meters), `loop` (the loop of `train` and `finetune`), `monitor` and `monitor_sets` (the run scored
against its base), `reuse`, `ablations` (Tab. 6 rows as overrides). The stage itself is the driver
`stages/train.py`.
"""
