"""The demo's data, without torch: scikit-learn's bundled digits, its fixed train/test split, and
the shifted streams the drift demo serves (export/demo.py trains on the same split)."""

from __future__ import annotations

import numpy as np

MAX_PIXEL = 16.0
SHIFTS = ("in_distribution", "inverted", "brightened")


def digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_test, y_test): raw pixels 0..16 as float32 (N, 1, 8, 8), int64
    labels; 25 % test, stratified, random_state=0."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    images = data.images.astype(np.float32)[:, None]
    x_train, x_test, y_train, y_test = train_test_split(
        images, data.target, test_size=0.25, random_state=0, stratify=data.target
    )
    return x_train, y_train.astype(np.int64), x_test, y_test.astype(np.int64)


def shifted(images: np.ndarray, shift: str) -> np.ndarray:
    """The same images as served after a change upstream: inverted or brightened pixels."""
    if shift == "inverted":
        return (MAX_PIXEL - images).astype(np.float32)
    if shift == "brightened":
        return np.clip(images + 8.0, 0.0, MAX_PIXEL).astype(np.float32)
    if shift == "in_distribution":
        return images
    raise ValueError(f"unknown shift {shift!r}; expected one of {SHIFTS}")
