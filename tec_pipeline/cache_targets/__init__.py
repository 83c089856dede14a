"""Stage one's library wing: what the drivers in
`stages/cache_targets.py`, `stages/dry_run.py` and `stages/verify.py` call, other than storage
(`tec_pipeline.cache`, shard assembly in `cache.assemble`) and the base forward
(`tec_pipeline.base_targets`). `settings` refuses impossible settings and writes the cache's
metadata, `view_dataset` renders the seeded views of a shard's images for the base (stage
one's `DataLoader`), `processes` splits shards between the processes of `accelerate launch`, `loop`
computes and writes a process's shards (`compute_shards`, what the benchmarks time too),
`summary` reports progress and the run, `estimate` measures a dry run and extrapolates it, and
`verify` recomputes stored views and compares them against tolerances.
"""
