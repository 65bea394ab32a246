"""TrainConfig: every setting of a training run, as JSON (unknown keys are an error).

A copy is written beside each checkpoint (config.json) and stored inside it, so a run
can always be told apart and resumed with the settings it started with.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from tusrec.model.network import ModelConfig

SAMPLING = ("per-clip", "sequential")


class TrainError(ValueError):
    """A run that cannot start as asked (data, config and run folder disagree): its
    message says what to change, in one line."""


def _strict(cls, d: dict, where: str) -> dict:
    if not isinstance(d, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(d).__name__}")
    unknown = set(d) - {f.name for f in fields(cls)}
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}")
    return d


@dataclass
class AugmentConfig:
    """Label-preserving augmentations, each applied to a clip with probability 0.5 when on.

    reverse: play the scan backwards. mirror: flip image columns about the crop centre.
    intensity: random gamma / contrast / brightness. frame_skip: largest k of "every k-th
    frame" (1 = off); k is drawn uniformly from 1..frame_skip.
    """

    reverse: bool = True
    mirror: bool = True
    intensity: bool = True
    frame_skip: int = 2
    # For members with ModelConfig.scan_conditioning: the probability that a clip's scan
    # code is zeroed ("name unknown"), so the member also learns the fallback for names
    # that do not parse (no effect, and no random draw, without conditioning).
    forget_name: float = 0.0

    @classmethod
    def from_dict(cls, d: dict) -> AugmentConfig:
        return cls(**_strict(cls, d, "augment"))


@dataclass
class LossConfig:
    """Weights of the loss terms (both in mm): per-transition point distance, and the
    point distance of the transforms chained over the clip (drift)."""

    points: float = 1.0
    drift: float = 0.1

    @classmethod
    def from_dict(cls, d: dict) -> LossConfig:
        return cls(**_strict(cls, d, "loss"))


@dataclass
class TrainConfig:
    """One member's training run.

    clip_frames: T frames per training clip (T-1 transitions). lr: peak AdamW learning
    rate (warmup over ``warmup_steps``, then cosine decay to 0 at ``steps``).
    val_subjects: held-out subject ids (e.g. ["003", "017"]) or a fraction of the subjects
    (e.g. 0.1, at least one when > 0); 0 or [] for no validation. val_every: steps between
    validations (and checkpoints).

    sampling: how the clips of a step are drawn. "per-clip": clip i of step s from its own
    generator seeded (seed, s, i) (sampler.clip_rng), so data-loader workers and DDP
    processes draw them in any order and the run is the same for any number of either.
    "sequential": all clips from one generator seeded ``seed``, in the training loop, in
    one process: how members were trained before "per-clip" existed (the shipped ones),
    kept so that they are still reproduced from their manifest entries. A config without
    the key is one of those, hence "sequential" (from_dict); new configs say "per-clip".

    rotation_share: the share of training clips drawn from 2025 rotation scans (the rest
    from the sweeps), each group still by length; 0 draws every scan by its length alone
    (the default, and how every shipped member was trained).

    clip_curriculum: [[step, frames], ...], the first at step 0, steps increasing: from
    each step on, clips have that many frames (short clips first, a curriculum); [] keeps
    ``clip_frames`` throughout (how every shipped member was trained). Scans shorter
    than the longest clip are never drawn, at any step. Needs "per-clip" sampling.
    """

    model: dict = field(default_factory=lambda: ModelConfig().to_dict())
    clip_frames: int = 24
    batch_size: int = 8
    lr: float = 3e-4
    weight_decay: float = 0.01
    warmup_steps: int = 100
    grad_clip: float = 1.0
    steps: int = 20000
    val_every: int = 500
    seed: int = 0
    val_subjects: list[str] | float = 0.1
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    sampling: str = "per-clip"
    rotation_share: float = 0.0
    clip_curriculum: list = field(default_factory=list)

    def __post_init__(self):
        self.model = ModelConfig.from_dict(self.model).to_dict()  # validates, normalises tuples
        if isinstance(self.augment, dict):
            self.augment = AugmentConfig.from_dict(self.augment)
        if isinstance(self.loss, dict):
            self.loss = LossConfig.from_dict(self.loss)
        if isinstance(self.val_subjects, list | tuple):
            self.val_subjects = [f"{int(s):03d}" for s in self.val_subjects]
        elif not 0.0 <= float(self.val_subjects) < 1.0:
            raise ValueError(f"val_subjects: a fraction must be in [0, 1), got {self.val_subjects}")
        if self.clip_frames < 2:
            raise ValueError("clip_frames must be at least 2")
        if self.augment.frame_skip < 1:
            raise ValueError("augment.frame_skip must be at least 1")
        if not 0.0 <= self.augment.forget_name <= 1.0:
            raise ValueError(f"augment.forget_name is a probability, got {self.augment.forget_name}")
        if not 0.0 <= self.rotation_share < 1.0:
            raise ValueError(f"rotation_share is a share of the clips in [0, 1), got {self.rotation_share}")
        if self.sampling not in SAMPLING:
            raise ValueError(f"sampling must be one of {SAMPLING}, got {self.sampling!r}")
        self.clip_curriculum = [[int(a), int(b)] for a, b in self.clip_curriculum]
        if self.clip_curriculum:
            starts = [a for a, _ in self.clip_curriculum]
            if starts[0] != 0 or any(b <= a for a, b in itertools.pairwise(starts)):
                raise ValueError(f"clip_curriculum: steps must start at 0 and increase, got {starts}")
            if min(b for _, b in self.clip_curriculum) < 2:
                raise ValueError("clip_curriculum: clips must have at least 2 frames")
            if self.sampling != "per-clip":
                raise ValueError(
                    "clip_curriculum draws each step's clips by step: it needs 'per-clip' sampling"
                )

        shortest = min(self.clip_lengths)
        m = len(self.model_config.frame_steps)
        if shortest < 2 * m:
            # a clip's first frames pair with the frame m after them, inside the clip's view
            raise ValueError(
                f"clips of {shortest} frames are too short for {m} decorrelation steps: use {2 * m}+"
            )

    def clip_frames_at(self, step: int) -> int:
        """Frames a clip of training step ``step`` has (clip_curriculum, else clip_frames)."""
        frames = self.clip_frames
        for start, n in self.clip_curriculum:
            if start <= step:
                frames = n
        return frames

    @property
    def clip_lengths(self) -> list[int]:
        """The clip lengths of this run, in frames: the curriculum's, else [clip_frames]."""
        return [n for _, n in self.clip_curriculum] or [self.clip_frames]

    @property
    def longest_clip(self) -> int:
        """The most frames a clip of this run ever has."""
        return max(self.clip_lengths)

    @property
    def model_config(self) -> ModelConfig:
        return ModelConfig.from_dict(self.model)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        d = _strict(cls, dict(d), "train config")
        d.setdefault("sampling", "sequential")  # written before per-clip sampling existed
        return cls(**d)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["model"] = {k: list(v) if isinstance(v, tuple) else v for k, v in d["model"].items()}
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> TrainConfig:
        return cls.from_dict(json.loads(text))

    def save(self, path: str | Path) -> None:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(self.to_json())
        tmp.replace(path)

    @staticmethod
    def _manifest_record(d, member: str | None) -> dict | None:
        """Member ``member``'s training record (trained) when ``d`` is a parsed weights
        manifest; None when it is a plain config."""
        if not (isinstance(d, dict) and "members" in d):
            return None
        entries = {m.get("name"): m for m in d["members"]}
        if member not in entries:
            raise ValueError(f"no member {member!r} in this manifest (it has {sorted(entries)})")
        trained = entries[member].get("trained")
        if not isinstance(trained, dict) or "config" not in trained:
            raise ValueError(f"member {member!r} has no training config in this manifest")
        return trained

    @classmethod
    def load(cls, path: str | Path, member: str | None = None) -> TrainConfig:
        """A TrainConfig JSON file, or a weights manifest.json: then the config member
        ``member`` was trained with (its entry's trained.config)."""
        path = Path(path)
        try:
            d = json.loads(path.read_text())
            trained = cls._manifest_record(d, member)
            return cls.from_dict(d if trained is None else trained["config"])
        except (ValueError, TypeError) as err:
            raise ValueError(f"{path}: {err}") from None

    @classmethod
    def schedule(cls, path: str | Path, member: str | None = None) -> list[int]:
        """The step totals a member's training ran through, in order (trained.schedule of
        its manifest entry): [steps] for one run, [1500, 3000, ...] when it was continued
        with --resume --steps, each continuation restarting the cosine schedule. [] for a
        plain config file or an entry without the record."""
        trained = cls._manifest_record(json.loads(Path(path).read_text()), member)
        return [int(v) for v in (trained or {}).get("schedule", [])]
