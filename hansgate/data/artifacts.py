"""Spurious artifacts that can be pasted onto images, chosen by name.

Each artifact works on float images ``[N, C, H, W]`` with values in ``[0, 1]`` and
says which pixels it touches (``mask``), so the same object serves the Clever-Hans
generator, the poisoned test sets, ground-truth masks for explanatory supervision,
and the known-artifact tests of the audit.

- ``corner``: the paper's 3-pixel "L" in the top-left corner (paper 000, Supp. C.1;
  rows/cols 1-2), full intensity.
- ``frame``: a one-pixel frame on the image border (the "mountain bike" frame of
  paper 000, Sec. 4.1, pasted rather than resized).
- ``stamp``: a text-like stamp, the letters "TS" in a 3x5 pixel font, bottom-right
  (a stand-in for timestamps and hospital tags).
- ``brightness``: ``0.7 x + 0.3`` everywhere (paper 001's unlocalized artifact).
- ``lsb``: a least-significant-bit payload (paper 001's other unlocalized artifact): every
  pixel is quantised to 8 bits and its 3 lowest bits are replaced by the next 3 bits of
  a text message ("hansgate", repeated in row-major order), so each pixel moves by at
  most 7/255, invisibly.
- ``dot``: a 2x2 dot in the bottom-left corner; used as a *control* artifact that
  no built-in training set contains.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hansgate.errors import ConfigError

__all__ = ["Artifact", "ARTIFACTS", "get_artifact"]

_GLYPHS = {
    "T": ["###", ".#.", ".#.", ".#.", ".#."],
    "S": ["###", "#..", "###", "..#", "###"],
}


def _lsb_payload(height: int, width: int, message: bytes = b"hansgate", bits: int = 3) -> torch.Tensor:
    """``[H, W]`` integers in ``[0, 2**bits)``: the message's bit stream, ``bits`` per pixel, repeated."""
    stream = [(byte >> (7 - k)) & 1 for byte in message for k in range(8)]
    need = height * width * bits
    stream = (stream * (need // len(stream) + 1))[:need]
    vals = [int("".join(map(str, stream[i : i + bits])), 2) for i in range(0, need, bits)]
    return torch.tensor(vals, dtype=torch.int64).view(height, width)


def _stamp_pattern(text: str = "TS") -> torch.Tensor:
    rows = ["." .join(_GLYPHS[ch][r] for ch in text) for r in range(5)]
    return torch.tensor([[1.0 if c == "#" else 0.0 for c in row] for row in rows])


@dataclass(frozen=True)
class Artifact:
    """A named artifact; ``kind`` selects the drawing rule, ``value`` the intensity."""

    name: str
    kind: str
    value: float = 1.0

    @property
    def localized(self) -> bool:
        """Whether the artifact occupies a region (it has a mask) or changes every pixel."""
        return self.kind not in ("brightness", "lsb")

    def mask(self, height: int, width: int) -> torch.Tensor:
        """``[H, W]`` float mask, 1 where the artifact draws (all ones if unlocalized)."""
        m = torch.zeros(height, width)
        if self.kind == "corner":
            m[1, 1] = m[2, 1] = m[2, 2] = 1.0
        elif self.kind == "frame":
            m[0, :] = m[-1, :] = m[:, 0] = m[:, -1] = 1.0
        elif self.kind == "stamp":
            p = _stamp_pattern()
            ph, pw = p.shape
            m[height - ph - 1 : height - 1, width - pw - 1 : width - 1] = p
        elif self.kind == "dot":
            m[height - 3 : height - 1, 1:3] = 1.0
        elif self.kind in ("brightness", "lsb"):
            m[:] = 1.0
        else:  # pragma: no cover - guarded by get_artifact
            raise ConfigError(f"unknown artifact kind {self.kind!r}")
        return m

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Return a copy of ``x`` ``[N, C, H, W]`` with the artifact on every image."""
        if self.kind == "brightness":
            return 0.7 * x + 0.3
        if self.kind == "lsb":
            q = (x.clamp(0, 1) * 255).round().to(torch.int64)
            q = (q & ~7) | _lsb_payload(x.shape[-2], x.shape[-1]).to(x.device)
            return (q.to(x.dtype) / 255).to(x)
        m = self.mask(x.shape[-2], x.shape[-1]).to(x)
        return x * (1 - m) + self.value * m

    def apply_where(self, x: torch.Tensor, which: torch.Tensor) -> torch.Tensor:
        """Copy of ``x`` with the artifact on the images where ``which`` ``[N]`` (bool) is true."""
        out = x.clone()
        if which.any():
            out[which] = self.apply(x[which])
        return out


ARTIFACTS: dict[str, Artifact] = {
    a.name: a
    for a in (
        Artifact("corner", "corner"),
        Artifact("frame", "frame"),
        Artifact("stamp", "stamp"),
        Artifact("brightness", "brightness"),
        Artifact("lsb", "lsb"),
        Artifact("dot", "dot"),
    )
}


def get_artifact(name: str) -> Artifact:
    """Look an artifact up by name; unknown names raise ``ConfigError``."""
    try:
        return ARTIFACTS[name]
    except KeyError:
        raise ConfigError(f"unknown artifact {name!r}; choose from {sorted(ARTIFACTS)}") from None
