import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_mnist.augment import draw_angles, random_affine, random_rotation, rotate_by, warp_nearest
from jax_mnist.data import MEAN, STD


@pytest.fixture
def images(test_images_raw):
    return jnp.asarray(test_images_raw[:16], jnp.float32)


def test_zero_rotation_is_identity(images):
    np.testing.assert_array_equal(rotate_by(images, jnp.zeros(16)), images)
    np.testing.assert_array_equal(random_rotation(jax.random.key(0), images, 0.0), images)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_right_angle_rotations_equal_rot90(images, k):
    rotated = rotate_by(images, jnp.full(16, 90.0 * k))
    np.testing.assert_array_equal(rotated, np.rot90(np.asarray(images), k=k, axes=(1, 2)))


@pytest.mark.parametrize("fill", [0.0, -MEAN / STD])
def test_corners_take_the_fill_value(fill):
    white = jnp.full((4, 28, 28, 1), 5.0)
    rotated = np.asarray(rotate_by(white, jnp.full(4, 45.0), fill=fill))
    for corner in (rotated[:, 0, 0], rotated[:, 0, -1], rotated[:, -1, 0], rotated[:, -1, -1]):
        np.testing.assert_allclose(corner, np.float32(fill))
    assert (rotated[:, 14, 14] == 5.0).all()


def test_shapes_dtype_and_labels_unchanged(test_images_raw):
    labels = jnp.arange(16)
    x = jnp.asarray(test_images_raw[:16])
    out = jax.jit(lambda k, x: random_rotation(k, x, 7.0))(jax.random.key(0), x)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert labels.tolist() == list(range(16))  # augmentation takes images only


def test_same_key_same_batch_different_keys_differ(images):
    a = random_rotation(jax.random.key(1), images, 15.0)
    b = random_rotation(jax.random.key(1), images, 15.0)
    c = random_rotation(jax.random.key(2), images, 15.0)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


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
        random_rotation(jax.random.key(4), images, 7.0), rotate_by(images, draw_angles(jax.random.key(4), 16, 7.0))
    )


def test_affine_identity_and_translation(images):
    np.testing.assert_array_equal(random_affine(jax.random.key(0), images), images)
    shifted = warp_nearest(images, jnp.broadcast_to(jnp.eye(2), (16, 2, 2)), jnp.tile(jnp.array([3.0, 0.0]), (16, 1)))
    np.testing.assert_array_equal(shifted[:, :, 3:], images[:, :, :-3])
    assert (np.asarray(shifted[:, :, :3]) == 0).all()


def test_affine_draws_differ_and_stay_finite(images):
    out = random_affine(jax.random.key(5), images, degrees=10, translate=0.1, scale=(0.9, 1.1))
    assert out.shape == images.shape and bool(jnp.isfinite(out).all())
    assert not np.array_equal(out, images)
