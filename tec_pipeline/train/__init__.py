"""Stage two's library wing, in the order a step's road reads it: `data` (a run's targets and
views, opened once from the config), `loader` (epoch order, masks and the run's loader), `batches`
(the cache as training reads it, its shard pool, source images, the batch makers), `model` (the
new model from its config, its first weights, the step's graph), `loop` (the visible loop of
`train`, the pieces `finetune`'s is built from, the accelerate set-up), `log` (records, meters,
the reuse line), `checkpoint` (checkpoint files, resume, identity), `schedule` (Tab. 8),
`monitor` (the run scored against its base), `ablations` (Tab. 6 rows as overrides). The stage
itself is the driver `stages/train.py`.
"""
