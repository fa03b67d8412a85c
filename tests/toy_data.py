"""Small structured inputs for the "a few training steps lower the loss" tests: learnable, unlike noise."""

import torch


def moving_squares(batch: int, frames: int, size: int, seed: int = 0, side: int = 8) -> torch.Tensor:
    """(batch, frames, size, size) float in [-1, 1]: a bright square on a dark background that moves one pixel
    to the right per frame (wrapping), from a random start per sequence."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.full((batch, frames, size, size), -0.6)
    for b in range(batch):
        row, col = torch.randint(0, size - side, (2,), generator=gen).tolist()
        for t in range(frames):
            c = (col + t) % (size - side)
            x[b, t, row:row + side, c:c + side] = 0.8
    return x
