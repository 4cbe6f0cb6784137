"""Training: config, loops, checkpoints with exact resume, torchrun DDP."""

from ravit.train.checkpoint import atomic_save, load_training_checkpoint
from ravit.train.config import TrainConfig, load_config
from ravit.train.loop import build_model, evaluate, train

__all__ = ["TrainConfig", "atomic_save", "build_model", "evaluate", "load_config", "load_training_checkpoint", "train"]
