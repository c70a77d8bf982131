"""The custom layer of `bump.keras`: pass this file with `--custom-objects`.

    derivcli grad sample_models/bump.keras --custom-objects sample_models/bump_layer.py --at 0.3
"""

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="derivcli_samples")
class Bump(keras.layers.Layer):
    """A trainable bump: exp(-s / (s - x^2)) inside |x| < s, else 0 (s = sigma).

    The bump is smooth everywhere (every derivative tends to 0 at the edge).
    The denominator is replaced by 1 outside the support before the division,
    so that no NaN or Inf is formed there and no NaN leaks into the gradient
    through `where` (the classic `tf.where` gradient trap).
    """

    def __init__(self, sigma: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        self.initial_sigma = sigma

    def build(self, input_shape):
        self.sigma = self.add_weight(
            name="sigma", shape=(), initializer=keras.initializers.Constant(self.initial_sigma)
        )

    def call(self, x):
        inside = ops.abs(x) < self.sigma
        gap = ops.where(inside, self.sigma - x * x, ops.ones_like(x))
        return ops.where(inside, ops.exp(-self.sigma / gap), ops.zeros_like(x))

    def get_config(self):
        return {**super().get_config(), "sigma": self.initial_sigma}


@keras.saving.register_keras_serializable(package="derivcli_samples")
class BumpConditionOnly(Bump):
    """The bug users bring: sigma decides the support, but the value ignores it.

    The value is exp(-1 / (1 - x^2)) inside |x| < sigma: sigma appears only in
    the comparison, so it gets no gradient and training never moves it.
    `derivcli doctor` names it.
    """

    def call(self, x):
        inside = ops.abs(x) < self.sigma
        gap = ops.where(inside, 1.0 - x * x, ops.ones_like(x))
        return ops.where(inside, ops.exp(-1.0 / gap), ops.zeros_like(x))
