"""Stage one's library wing (README "Stage one: the target cache"): what the stage-one drivers
under `stages/` call, other than storage (`tec_pipeline.cache`) and the base forward
(`tec_pipeline.base_targets`). `verify` recomputes stored views and compares them against
tolerances.
"""
