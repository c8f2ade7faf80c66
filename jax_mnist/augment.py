"""On-device augmentation: pure functions of ``(key, images)`` that run inside jit.

Every image gets its own random draw. Warps are inverse-mapped with
nearest-neighbour sampling (torchvision's default for RandomRotation and
RandomAffine) as one gather per batch; pixels that come from outside the image
take ``fill``, which must be the value of a black pixel in the space the images
are in: 0 for raw pixels, ``-MEAN / STD`` after normalisation.

Angles follow torchvision: positive is counter-clockwise as displayed (row 0 at
the top), so a 90 degree rotation equals ``np.rot90``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def warp_nearest(images: jax.Array, inverse: jax.Array, shift: jax.Array, fill: float = 0.0) -> jax.Array:
    """Resample NHWC ``images`` with per-image inverse affine maps about the image centre.

    Output pixel ``p`` (as (x, y) relative to the centre) reads input pixel
    ``inverse[n] @ (p - shift[n])``; ``inverse`` is (N, 2, 2), ``shift`` (N, 2) in pixels.
    """
    n, h, w, c = images.shape
    ys, xs = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32), indexing="ij")
    centred = jnp.stack([xs - (w - 1) / 2, ys - (h - 1) / 2])  # (2, H, W)
    rel = centred[None] - shift[:, :, None, None]  # (N, 2, H, W)
    src = jnp.einsum("nij,njhw->nihw", inverse, rel)
    # Round half to even, as grid_sample's nearest mode does.
    src_x = jnp.round(src[:, 0] + (w - 1) / 2).astype(jnp.int32)
    src_y = jnp.round(src[:, 1] + (h - 1) / 2).astype(jnp.int32)
    inside = (src_x >= 0) & (src_x < w) & (src_y >= 0) & (src_y < h)
    flat_index = jnp.clip(src_y, 0, h - 1) * w + jnp.clip(src_x, 0, w - 1)  # (N, H, W)
    gathered = jnp.take_along_axis(images.reshape(n, h * w, c), flat_index.reshape(n, h * w, 1), axis=1)
    gathered = gathered.reshape(n, h, w, c)
    return jnp.where(inside[..., None], gathered, jnp.asarray(fill, images.dtype))


def _rotation_inverse(angles_deg: jax.Array) -> jax.Array:
    """(N, 2, 2) maps from output to input coordinates (x right, y down) for CCW rotations."""
    theta = jnp.deg2rad(angles_deg)
    cos, sin = jnp.cos(theta), jnp.sin(theta)
    # Displayed CCW rotation by theta, inverted: x_in = cos x - sin y, y_in = sin x + cos y.
    return jnp.stack([jnp.stack([cos, -sin], -1), jnp.stack([sin, cos], -1)], -2)


def rotate_by(images: jax.Array, angles_deg: jax.Array, fill: float = 0.0) -> jax.Array:
    """Rotate each image by its own angle (degrees, counter-clockwise)."""
    return warp_nearest(images, _rotation_inverse(angles_deg), jnp.zeros((images.shape[0], 2)), fill)


def draw_angles(key: jax.Array, n: int, degrees: float) -> jax.Array:
    """n angles uniform in [-degrees, degrees]."""
    return jax.random.uniform(key, (n,), minval=-degrees, maxval=degrees)


def random_rotation(key: jax.Array, images: jax.Array, degrees: float, fill: float = 0.0) -> jax.Array:
    """torchvision ``RandomRotation(degrees)``: angle uniform in [-degrees, degrees] per image."""
    return rotate_by(images, draw_angles(key, images.shape[0], degrees), fill)


def random_affine(
    key: jax.Array,
    images: jax.Array,
    degrees: float = 0.0,
    translate: float = 0.0,
    scale: tuple[float, float] = (1.0, 1.0),
    fill: float = 0.0,
) -> jax.Array:
    """torchvision ``RandomAffine(degrees, translate=(t, t), scale=scale)`` per image.

    Translation is a whole number of pixels up to ``translate`` times the image
    size in each direction (torchvision rounds it too); scale is uniform in ``scale``.
    """
    n, h, w, _ = images.shape
    k_angle, k_shift, k_scale = jax.random.split(key, 3)
    angles = draw_angles(k_angle, n, degrees)
    limits = jnp.array([translate * w, translate * h])
    shift = jnp.round(jax.random.uniform(k_shift, (n, 2), minval=-1.0, maxval=1.0) * limits)
    scales = jax.random.uniform(k_scale, (n,), minval=scale[0], maxval=scale[1])
    inverse = _rotation_inverse(angles) / scales[:, None, None]
    return warp_nearest(images, inverse, shift, fill)
