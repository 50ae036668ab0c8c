"""The PyTorch worker/server of --mode ps (common/parameter_server.py runs the protocol).

The whole model is one pipeline stage (train_torch/pipeline.py does its
arithmetic); this adds the flat vectors the server and workers exchange.
"""

import torch
from torch.nn.utils import parameters_to_vector

from common.parameter_server import ParameterServerRunner
from train_torch.device import to_device, to_numpy
from train_torch.pipeline import TorchPipelineRunner


class TorchParameterServerRunner(ParameterServerRunner, TorchPipelineRunner):
    def gradient_vector(self):
        return to_numpy(torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                                   for p in self.parameters]))

    def set_gradient_vector(self, vector):
        for parameter, piece in self._pieces(vector):
            parameter.grad = piece.clone()

    def parameter_vector(self):
        return to_numpy(parameters_to_vector(self.parameters).detach())

    @torch.no_grad()
    def set_parameter_vector(self, vector):
        for parameter, piece in self._pieces(vector):
            parameter.copy_(piece)

    def _pieces(self, vector):
        offset = 0
        for parameter in self.parameters:
            piece = to_device(vector[offset:offset + parameter.numel()], self.device)
            yield parameter, piece.reshape(parameter.shape)
            offset += parameter.numel()
