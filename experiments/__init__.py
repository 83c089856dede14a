"""Studies on the built-in demo, run from the repository root as ``python -m experiments NAME``.

Not part of the installed package: each study composes the product's stages
(`tec_pipeline.stages.demo`, `tec_pipeline.stages.finetune`, ...) into a question about the method
(several seeds, fine-tuning, what caching costs) or makes the demo's shipped base. The library and
the stages never import this package.
"""
