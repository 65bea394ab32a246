"""Training of ensemble members: configuration, data cache, clip sampler, loss, trainer.

    from tusrec.train import TrainConfig, train_member
    train_member("data/train", "runs/m0", TrainConfig.load("config.json"), "member0")

Heavy imports (torch) happen in the submodules; this package only re-exports.
"""

from tusrec.train.config import AugmentConfig, LossConfig, TrainConfig

__all__ = ["AugmentConfig", "LossConfig", "TrainConfig", "train_member"]


def __getattr__(name: str):
    if name == "train_member":
        from tusrec.train.trainer import train_member

        return train_member
    raise AttributeError(name)
