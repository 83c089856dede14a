"""Scoring an encoder by the paper's protocols: full fine-tuning (Tab. 10) and linear probing
(Tab. 11, and Tab. 4's "+ input adapter FT"), built from timm's parts. The loop that drives them
is `tec_pipeline.stages.finetune`."""
