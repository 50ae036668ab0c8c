"""The TensorFlow worker/server of --mode ps (common/parameter_server.py runs the protocol).

The whole model is one pipeline stage (train_tf/pipeline.py does its
arithmetic); this adds the flat vectors the server and workers exchange.
"""

import numpy as np
import tensorflow as tf

from common.parameter_server import ParameterServerRunner
from train_tf.pipeline import TensorFlowPipelineRunner


class TensorFlowParameterServerRunner(ParameterServerRunner, TensorFlowPipelineRunner):
    def gradient_vector(self):
        return np.concatenate([np.asarray(gradient).reshape(-1) for gradient in self.gradients])

    def set_gradient_vector(self, vector):
        self.gradients = [tf.constant(piece) for piece in self._pieces(vector)]

    def parameter_vector(self):
        return np.concatenate([variable.numpy().reshape(-1) for variable in self.variables])

    def set_parameter_vector(self, vector):
        for variable, piece in zip(self.variables, self._pieces(vector)):
            variable.assign(piece)

    def _pieces(self, vector):
        offset = 0
        for variable in self.variables:
            size = int(np.prod(variable.shape))
            yield vector[offset:offset + size].reshape(tuple(variable.shape))
            offset += size
