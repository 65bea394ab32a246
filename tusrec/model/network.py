"""The dual-encoder network: scan frames -> each frame's rigid transform to the previous one.

Modelled on DualTrack, the method that won TUS-REC 2024, scaled by ModelConfig:

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

Output transforms are T(i->i-1) in TUS-REC image millimetres (docs/conventions.md section 2):
the crop and resize of the input do not change the frame the labels live in.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import roma
import torch
from torch import nn

ARCHITECTURES = ("dual-encoder", "pair")


@dataclass
class ModelConfig:
    """Everything that shapes a member's network and its input. Saved beside weights."""

    architecture: str = "dual-encoder"  # or "pair": the frame-pair baseline (PairNet)
    input_size: tuple[int, int] = (64, 80)  # (h, w) after cropping to the field of view
    # A second input channel: speckle decorrelation with the previous frame, measured at
    # native resolution (inputs.decorrelation_u8). Only the local encoder sees it.
    decorrelation: bool = True
    # Multi-step decorrelation: channels for frame steps 1..decorrelation_steps (frame i
    # with i-1, i-2, ...). One step gives the size of the out-of-plane motion; two also
    # tell whether it went on in the same direction or turned back (frames i and i-2 are
    # far apart, or close), never which direction. Only with ``decorrelation``.
    decorrelation_steps: int = 1
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
    # Condition on what the scan's name says (inputs.scan_code: direction, Par/Per,
    # rotation scan): the kind flags are embedded into the transition tokens, and the
    # output is head(z) + direction * signed_head(z), so reversing a scan flips exactly
    # the part of the motion that only the direction can tell. Off: the network of old.
    scan_conditioning: bool = False
    # A 10th output per transition: the log of the member's expected error there (the mean
    # point distance, mm, between its T(i->i-1) and the true one). Its head reads the
    # pose features detached, so it never changes the pose: it is fitted after the pose
    # (tusrec.train.error_head), and a member with it predicts exactly the transforms it
    # predicted without it.
    error_head: bool = False

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        d = dict(d)
        for k in ("input_size", "channels", "global_channels"):
            if k in d:
                d[k] = tuple(d[k])
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown model config keys {sorted(unknown)}")
        cfg = cls(**d)
        if cfg.architecture not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {cfg.architecture!r}: expected one of {ARCHITECTURES}")
        if cfg.decorrelation_steps < 1:
            raise ValueError(f"decorrelation_steps must be at least 1, got {cfg.decorrelation_steps}")
        return cfg

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def in_channels(self) -> int:
        """Channels of the local input: frames, plus one per decorrelation step when on."""
        return 1 + len(self.frame_steps)

    @property
    def frame_steps(self) -> tuple[int, ...]:
        """Frame steps of the decorrelation channels, in channel order: (1, ..., m), or ()."""
        return tuple(range(1, self.decorrelation_steps + 1)) if self.decorrelation else ()

    @property
    def outputs(self) -> int:
        """Raw outputs per transition: 9 pose values (pose9_to_matrix), + 1 with error_head."""
        return 9 + int(self.error_head)


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
    """Video (B, C, T, h, w) -> transition tokens (B, T-1, dim); C = cfg.in_channels."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = cfg.in_channels
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
        """video (B, C, T, h, w); positions (B, T-1) in [0, 1] -> (B, T-1, dim)."""
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
    """Transition tokens attend to global tokens; -> (B, T, cfg.outputs) raw outputs."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attend = nn.MultiheadAttention(cfg.dim, cfg.heads, batch_first=True)
        self.norm = nn.LayerNorm(cfg.dim)
        self.head = nn.Sequential(nn.Linear(cfg.dim, cfg.dim), nn.GELU(), nn.Linear(cfg.dim, 9))
        # Start at the identity motion: training begins from "the probe did not move".
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)
        self.signed_head = _signed_head(cfg.dim, cfg.dim) if cfg.scan_conditioning else None
        self.error_head = _error_head(cfg.dim) if cfg.error_head else None

    def forward(
        self, local: torch.Tensor, global_: torch.Tensor, direction: torch.Tensor | None = None
    ) -> torch.Tensor:
        """local (B, T, dim), global_ (B, G, dim), direction (B,) in {-1, 0, 1} -> (B, T, outputs)."""
        context, _ = self.attend(local, global_, global_, need_weights=False)
        z = self.norm(local + context)
        return _with_error(_signed_output(self.head(z), self.signed_head, z, direction), self.error_head, z)


def _signed_head(features: int, dim: int) -> nn.Module:
    """The part of the output that flips with the scan direction: an MLP (..., features)
    -> (..., 9), zero at initialisation like the main head."""
    head = nn.Sequential(nn.Linear(features, dim), nn.GELU(), nn.Linear(dim, 9))
    nn.init.zeros_(head[-1].weight)
    nn.init.zeros_(head[-1].bias)
    return head


def _signed_output(
    raw: torch.Tensor, signed_head: nn.Module | None, z: torch.Tensor, direction: torch.Tensor | None
) -> torch.Tensor:
    """raw (B, T, 9) + direction (B,) * signed_head(z) (B, T, 9); raw alone without the head."""
    if signed_head is None or direction is None:
        return raw
    return raw + direction.to(raw.dtype)[:, None, None] * signed_head(z)


def _error_head(features: int, hidden: int = 64) -> nn.Module:
    """(..., features) -> (..., 1): the log of the expected point error (mm) of a transition."""
    return nn.Sequential(nn.Linear(features, hidden), nn.GELU(), nn.Linear(hidden, 1))


def _with_error(raw: torch.Tensor, error_head: nn.Module | None, z: torch.Tensor) -> torch.Tensor:
    """raw (B, T, 9), plus error_head(z) as a 10th column when there is one. The head sees
    z detached: no gradient of its loss reaches the pose."""
    if error_head is None:
        return raw
    return torch.cat([raw, error_head(z.detach()).to(raw.dtype)], dim=-1)


def _split_code(
    code: torch.Tensor | None, batch: int, like: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scan codes (B, 4) (inputs.scan_code; None = unknown) -> direction (B,), kind flags (B, 3)."""
    if code is None:
        code = like.new_zeros(batch, 4)
    code = code.to(like.dtype)
    return code[:, 0], code[:, 1:]


_IDENTITY_6D = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 0.0])


def pose9_to_matrix(raw: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Raw outputs (..., 9) -> rigid transforms (..., 4, 4); a 10th column (error_head) is
    not part of the pose and is ignored.

    Rotation: the 6D representation (two columns, Gram-Schmidt; continuous, Zhou et al.
    2019) offset from the identity by ``rotation_scale * raw[..., :6]``. Translation:
    ``translation_scale_mm * raw[..., 6:]`` in mm.
    """
    six = _IDENTITY_6D.to(raw) + cfg.rotation_scale * raw[..., :6]
    R = roma.special_gramschmidt(six.reshape(*six.shape[:-1], 2, 3).transpose(-1, -2))
    T = torch.zeros(*raw.shape[:-1], 4, 4, dtype=raw.dtype, device=raw.device)
    T[..., :3, :3] = R
    T[..., :3, 3] = cfg.translation_scale_mm * raw[..., 6:9]
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
        # The kind of scan (Par / Per sweep, rotation scan), added to every transition token.
        self.kind = nn.Linear(3, self.cfg.dim, bias=False) if self.cfg.scan_conditioning else None

    def encode_global(self, frames: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """frames (B, G, h, w), positions (B, G) in [0, 1] -> (B, G, dim)."""
        return self.global_(frames, positions)

    def forward(
        self,
        video: torch.Tensor,
        positions: torch.Tensor,
        global_tokens: torch.Tensor,
        code: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """video (B, C, T, h, w) normalised frames (+ decorrelation); positions (B, T-1) scan positions of
        the transitions in [0, 1]; global_tokens (B, G, dim); code (B, 4) scan codes
        (inputs.scan_code; None: unknown; ignored without cfg.scan_conditioning).
        Returns raw (B, T-1, cfg.outputs)."""
        tokens = self.local(video, positions)
        if self.kind is None:
            return self.fusion(tokens, global_tokens)
        direction, kind = _split_code(code, video.shape[0], tokens)
        return self.fusion(tokens + self.kind(kind)[:, None], global_tokens, direction)


class PairNet(nn.Module):
    """The frame-pair baseline, in the style of the organisers' baseline: frames i-1 and i
    (and frame i's decorrelation maps when cfg.decorrelation) stacked as channels, a 2D CNN,
    global average pooling and an MLP -> T(i->i-1). No temporal context, no global
    encoder: every transition is estimated on its own. Same call signature as
    TrackerlessNet, so training, windowed inference and the ensemble code serve both.

    cfg.channels sets the CNN stages (each: a stride-2 and a stride-1 3x3 convolution).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        layers: list[nn.Module] = []
        c_in = 1 + cfg.in_channels
        for c in cfg.channels:
            layers += [
                nn.Conv2d(c_in, c, 3, stride=2, padding=1),
                nn.GroupNorm(4, c),
                nn.GELU(),
                nn.Conv2d(c, c, 3, padding=1),
                nn.GroupNorm(4, c),
                nn.GELU(),
            ]
            c_in = c
        self.cnn = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Linear(c_in, cfg.dim), nn.GELU(), nn.Linear(cfg.dim, 9))
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)
        self.kind = nn.Linear(3, c_in, bias=False) if cfg.scan_conditioning else None
        self.signed_head = _signed_head(c_in, cfg.dim) if cfg.scan_conditioning else None
        self.error_head = _error_head(c_in) if cfg.error_head else None

    def encode_global(self, frames: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """No global context: an empty token set (B, 0, dim)."""
        return frames.new_zeros(frames.shape[0], 0, self.cfg.dim)

    def forward(
        self,
        video: torch.Tensor,
        positions: torch.Tensor,
        global_tokens: torch.Tensor,
        code: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """video (B, C, T, h, w) -> raw (B, T-1, cfg.outputs); positions and global_tokens unused;
        code (B, 4) as for TrackerlessNet (only with cfg.scan_conditioning)."""
        b, _, t, h, w = video.shape
        prev, cur = video[:, :1, :-1], video[:, :1, 1:]  # frames only: (B, 1, T-1, h, w)
        parts = [prev, cur] + ([video[:, 1:, 1:]] if self.cfg.decorrelation else [])
        pairs = torch.cat(parts, dim=1).transpose(1, 2).reshape(b * (t - 1), 1 + self.cfg.in_channels, h, w)
        features = self.cnn(pairs).mean(dim=(-2, -1)).view(b, t - 1, -1)
        if self.kind is None:
            return _with_error(self.head(features), self.error_head, features)
        direction, kind = _split_code(code, b, features)
        features = features + self.kind(kind)[:, None]
        raw = _signed_output(self.head(features), self.signed_head, features, direction)
        return _with_error(raw, self.error_head, features)


def build_network(cfg: ModelConfig) -> nn.Module:
    """The network cfg.architecture names, freshly initialised."""
    return PairNet(cfg) if cfg.architecture == "pair" else TrackerlessNet(cfg)
