"""megamora: pretraining LLaMA from scratch with MoRA, LoRA, ReLoRA and ReMoRA."""

__version__ = "0.1.0"
