"""tec-pipeline: TEC (Towards Sustainable Self-supervised Learning) as a two-stage offline pipeline."""
__version__ = "0.1.0"
