"""The dual-encoder network: scan frames -> each frame's rigid transform to the previous one.

Modelled on what won TUS-REC (DualTrack, TUSREC.md section 7), scaled by ModelConfig:

* local encoder: a 3D CNN over the scan as a video (B, 1, T, h, w), 'same' padded in
  time, so every frame's features see a few neighbours on each side and a long scan
  can be cut into overlapping windows without seams; the features of frames i-1 and i
  are paired, pooled by spatial attention and passed through temporal self-attention:
  one token per transition i-1 -> i (frame-to-frame motion, speckle decorrelation);
* global encoder: a 2D CNN over G frames sampled evenly across the whole scan, with
  their scan positions embedded, then a transformer: anatomical context, drift control;
* fusion: each transition token (with its scan position) attends to the global
  tokens; an MLP predicts a rotation (6D representation, Gram-Schmidt to SO(3), zero
  output = identity) and a translation in mm.

Output transforms are T(i->i-1) in TUS-REC image millimetres (TUSREC.md section 2):
the crop and resize of the input do not change the frame the labels live in.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import roma
import torch
from torch import nn


@dataclass
class ModelConfig:
    """Everything that shapes a member's network and its input. Saved beside weights."""

    input_size: tuple[int, int] = (64, 80)  # (h, w) after cropping to the field of view
    channels: tuple[int, ...] = (16, 32, 48, 64)  # local 3D CNN stages (stride 2 each)
    global_channels: tuple[int, ...] = (16, 32, 48, 64)  # global 2D CNN stages
    dim: int = 96  # token width
    heads: int = 4
    local_layers: int = 1  # temporal self-attention layers over transitions
    global_layers: int = 1
    global_frames: int = 16  # G frames sampled across the whole scan
    window: int = 96  # transitions per local window at inference
    overlap: int = 16  # transitions of context on each side of a window
    translation_scale_mm: float = 1.0  # network output unit for translation
    rotation_scale: float = 0.05  # network output unit for the 6D rotation offset

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        d = dict(d)
        for k in ("input_size", "channels", "global_channels"):
            if k in d:
                d[k] = tuple(d[k])
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown model config keys {sorted(unknown)}")
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)


def _position_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of scan positions t in [0, 1]: (...,) -> (..., dim)."""
    freqs = torch.exp(torch.arange(0, dim, 2, device=t.device, dtype=t.dtype) * (-math.log(1000.0) / dim))
    angles = t[..., None] * 1000.0 * freqs
    emb = torch.zeros(*t.shape, dim, device=t.device, dtype=t.dtype)
    emb[..., 0::2] = torch.sin(angles)
    emb[..., 1::2] = torch.cos(angles)
    return emb


class SpatialAttentionPool(nn.Module):
    """(B, C, h, w) -> (B, C): a softmax-weighted sum over positions."""

    def __init__(self, channels: int):
        super().__init__()
        self.logits = nn.Conv2d(channels, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = torch.softmax(self.logits(x).flatten(1), dim=1)  # (B, h*w)
        return (x.flatten(2) * w[:, None, :]).sum(-1)


def _self_attention(cfg: ModelConfig, layers: int) -> nn.TransformerEncoder:
    """Self-attention over a sequence of tokens (B, S, dim) -> (B, S, dim)."""
    layer = nn.TransformerEncoderLayer(cfg.dim, cfg.heads, 2 * cfg.dim, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)


class LocalEncoder(nn.Module):
    """Video (B, 1, T, h, w) -> transition tokens (B, T-1, dim)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 1
        for c in cfg.channels:
            # Temporal kernel 3, 'same' padding: each layer widens the temporal context by
            # one frame each side; spatial stride 2 halves the image.
            layers += [
                nn.Conv3d(c_in, c, (3, 3, 3), stride=(1, 2, 2), padding=(1, 1, 1)),
                nn.GroupNorm(4, c),
                nn.GELU(),
            ]
            c_in = c
        self.cnn = nn.Sequential(*layers)
        self.pair = nn.Conv2d(3 * c_in, cfg.dim, 1)
        self.pool = SpatialAttentionPool(cfg.dim)
        self.temporal = _self_attention(cfg, cfg.local_layers)

    def forward(self, video: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """video (B, 1, T, h, w); positions (B, T-1) in [0, 1] -> (B, T-1, dim)."""
        f = self.cnn(video)  # (B, C, T, h', w')
        prev, cur = f[:, :, :-1], f[:, :, 1:]
        pair = torch.cat([prev, cur, cur - prev], dim=1)  # (B, 3C, T-1, h', w')
        b, c, t, h, w = pair.shape
        pair = pair.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
        tokens = self.pool(self.pair(pair)).view(b, t, -1)
        tokens = tokens + _position_embedding(positions, tokens.shape[-1])
        return self.temporal(tokens)


class GlobalEncoder(nn.Module):
    """Sparse frames (B, G, h, w) with positions (B, G) -> global tokens (B, G, dim)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 1
        for c in cfg.global_channels:
            layers += [nn.Conv2d(c_in, c, 3, stride=2, padding=1), nn.GroupNorm(4, c), nn.GELU()]
            c_in = c
        self.cnn = nn.Sequential(*layers)
        self.proj = nn.Conv2d(c_in, cfg.dim, 1)
        self.pool = SpatialAttentionPool(cfg.dim)
        self.temporal = _self_attention(cfg, cfg.global_layers)

    def forward(self, frames: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        b, g, h, w = frames.shape
        x = self.pool(self.proj(self.cnn(frames.reshape(b * g, 1, h, w)))).view(b, g, -1)
        return self.temporal(x + _position_embedding(positions, x.shape[-1]))


class Fusion(nn.Module):
    """Transition tokens attend to global tokens; -> (B, T, 9) raw pose outputs."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attend = nn.MultiheadAttention(cfg.dim, cfg.heads, batch_first=True)
        self.norm = nn.LayerNorm(cfg.dim)
        self.head = nn.Sequential(nn.Linear(cfg.dim, cfg.dim), nn.GELU(), nn.Linear(cfg.dim, 9))
        # Start at the identity motion: training begins from "the probe did not move".
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)

    def forward(self, local: torch.Tensor, global_: torch.Tensor) -> torch.Tensor:
        context, _ = self.attend(local, global_, global_, need_weights=False)
        return self.head(self.norm(local + context))


_IDENTITY_6D = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 0.0])


def pose9_to_matrix(raw: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Raw outputs (..., 9) -> rigid transforms (..., 4, 4).

    Rotation: the 6D representation (two columns, Gram-Schmidt; continuous, Zhou et al.
    2019) offset from the identity by ``rotation_scale * raw[..., :6]``. Translation:
    ``translation_scale_mm * raw[..., 6:]`` in mm.
    """
    six = _IDENTITY_6D.to(raw) + cfg.rotation_scale * raw[..., :6]
    R = roma.special_gramschmidt(six.reshape(*six.shape[:-1], 2, 3).transpose(-1, -2))
    T = torch.zeros(*raw.shape[:-1], 4, 4, dtype=raw.dtype, device=raw.device)
    T[..., :3, :3] = R
    T[..., :3, 3] = cfg.translation_scale_mm * raw[..., 6:]
    T[..., 3, 3] = 1
    return T


class TrackerlessNet(nn.Module):
    """One ensemble member. forward(video, positions, global_frames, global_positions)."""

    def __init__(self, cfg: ModelConfig | None = None):
        super().__init__()
        self.cfg = cfg or ModelConfig()
        self.local = LocalEncoder(self.cfg)
        self.global_ = GlobalEncoder(self.cfg)
        self.fusion = Fusion(self.cfg)

    def encode_global(self, frames: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """frames (B, G, h, w), positions (B, G) in [0, 1] -> (B, G, dim)."""
        return self.global_(frames, positions)

    def forward(
        self, video: torch.Tensor, positions: torch.Tensor, global_tokens: torch.Tensor
    ) -> torch.Tensor:
        """video (B, 1, T, h, w) normalised frames; positions (B, T-1) scan positions of
        the transitions in [0, 1]; global_tokens (B, G, dim). Returns raw (B, T-1, 9)."""
        return self.fusion(self.local(video, positions), global_tokens)
