"""A custom layer for the test zoo: its value is plain mathematics, its gradient is not.

`CenteredSoftplus` computes y = w * softplus(x - mean(x)) over the last axis, but
the way a training graph often does: the mean enters through `stop_gradient`, and
softplus carries a straight-through custom gradient (the gradient of the identity).
Its derivatives, at every order, are those of the formula; a tool that
differentiates the training graph gets even the first derivative wrong.
"""

import keras
import tensorflow as tf


@keras.saving.register_keras_serializable(package="zoo")
class CenteredSoftplus(keras.layers.Layer):
    def build(self, input_shape):
        self.w = self.add_weight(shape=(input_shape[-1],), initializer="ones", name="w")

    def call(self, x):
        @tf.custom_gradient
        def softplus_straight_through(u):
            return tf.math.softplus(u), lambda upstream: upstream

        mean = tf.reduce_mean(x, axis=-1, keepdims=True)
        return self.w * softplus_straight_through(x - tf.stop_gradient(mean))
