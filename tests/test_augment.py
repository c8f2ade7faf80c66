import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_mnist.augment import draw_angles, random_affine, random_rotation, rotate_by, warp_nearest
from jax_mnist.data import MEAN, STD


@pytest.fixture
def images(test_images_raw):
    return jnp.asarray(test_images_raw[:16], jnp.float32)


@pytest.mark.slow  # compiles or trains: seconds on the 2-core CPU
def test_zero_rotation_is_identity(images):
    np.testing.assert_array_equal(rotate_by(images, jnp.zeros(16)), images)
    np.testing.assert_array_equal(random_rotation(jax.random.key(0), images, 0.0), images)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_right_angle_rotations_equal_rot90(images, k):
    rotated = rotate_by(images, jnp.full(16, 90.0 * k))
    np.testing.assert_array_equal(rotated, np.rot90(np.asarray(images), k=k, axes=(1, 2)))


@pytest.mark.slow  # compiles or trains: seconds on the 2-core CPU
@pytest.mark.parametrize("fill", [0.0, -MEAN / STD])
def test_corners_take_the_fill_value(fill):
    white = jnp.full((4, 28, 28, 1), 5.0)
    rotated = np.asarray(rotate_by(white, jnp.full(4, 45.0), fill=fill))
    for corner in (rotated[:, 0, 0], rotated[:, 0, -1], rotated[:, -1, 0], rotated[:, -1, -1]):
        np.testing.assert_allclose(corner, np.float32(fill))
    assert (rotated[:, 14, 14] == 5.0).all()


def test_shape_and_dtype_are_kept_under_jit(test_images_raw):
    x = jnp.asarray(test_images_raw[:16])
    out = jax.jit(lambda k, x: random_rotation(k, x, 7.0))(jax.random.key(0), x)
    assert out.shape == x.shape and out.dtype == x.dtype


def test_same_key_same_batch_different_keys_differ(images):
    a = random_rotation(jax.random.key(1), images, 15.0)
    b = random_rotation(jax.random.key(1), images, 15.0)
    c = random_rotation(jax.random.key(2), images, 15.0)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.slow  # compiles or trains: seconds on the 2-core CPU
def test_each_image_gets_its_own_angle():
    # One image repeated: different draws per image give different results.
    one = jnp.broadcast_to(jnp.eye(28)[None, :, :, None], (8, 28, 28, 1))
    out = np.asarray(random_rotation(jax.random.key(3), one, 30.0))
    assert len({o.tobytes() for o in out}) > 1


def test_angles_fall_within_range(images):
    angles = np.asarray(draw_angles(jax.random.key(4), 10_000, 7.0))
    assert angles.min() >= -7.0 and angles.max() <= 7.0
    assert angles.min() < -6.9 and angles.max() > 6.9  # the whole range is used
    # random_rotation rotates by exactly these draws.
    np.testing.assert_array_equal(
        random_rotation(jax.random.key(4), images, 7.0),
        rotate_by(images, draw_angles(jax.random.key(4), 16, 7.0)),
    )


def test_affine_identity_and_translation(images):
    np.testing.assert_array_equal(random_affine(jax.random.key(0), images), images)
    shifted = warp_nearest(
        images, jnp.broadcast_to(jnp.eye(2), (16, 2, 2)), jnp.tile(jnp.array([3.0, 0.0]), (16, 1))
    )
    np.testing.assert_array_equal(shifted[:, :, 3:], images[:, :, :-3])
    assert (np.asarray(shifted[:, :, :3]) == 0).all()


def _shifted(image: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """``image`` (28, 28, 1) moved right by ``dx`` and down by ``dy`` pixels, black coming in."""
    out = np.zeros_like(image)
    src = image[max(0, -dy) : 28 - max(0, dy), max(0, -dx) : 28 - max(0, dx)]
    out[max(0, dy) : max(0, dy) + src.shape[0], max(0, dx) : max(0, dx) + src.shape[1]] = src
    return out


def test_affine_translation_is_a_whole_pixel_shift_within_the_limit(images):
    """translate=0.1 of 28 pixels: every image is its own shift by at most 2 whole pixels each way
    (torchvision rounds 0.1 * 28 = 2.8 down to a draw in [-2.8, 2.8], then to whole pixels)."""
    out = np.asarray(random_affine(jax.random.key(6), images, translate=0.1))
    source = np.asarray(images)
    seen = set()
    for k in range(16):
        shifts = [
            (dx, dy)
            for dx in range(-3, 4)
            for dy in range(-3, 4)
            if np.array_equal(out[k], _shifted(source[k], dx, dy))
        ]
        assert shifts, f"image {k} is not a whole-pixel shift of its input"
        assert all(abs(dx) <= 3 and abs(dy) <= 3 for dx, dy in shifts)
        seen.add(shifts[0])
    assert len(seen) > 3  # each image draws its own shift


def test_affine_scale_grows_and_shrinks_the_ink(images):
    ink = lambda x: np.count_nonzero(np.asarray(x) > 0, axis=(1, 2, 3)).astype(float)
    before = ink(images)
    bigger = ink(random_affine(jax.random.key(7), images, scale=(1.5, 1.5)))
    smaller = ink(random_affine(jax.random.key(7), images, scale=(0.5, 0.5)))
    # Area grows with the square of the scale (nearest neighbour: up to rounding).
    assert np.all(bigger / before > 1.5) and np.all(smaller / before < 0.5)


def test_affine_draws_differ_and_stay_finite(images):
    out = random_affine(jax.random.key(5), images, degrees=10, translate=0.1, scale=(0.9, 1.1))
    assert out.shape == images.shape and bool(jnp.isfinite(out).all())
    assert not np.array_equal(out, images)
