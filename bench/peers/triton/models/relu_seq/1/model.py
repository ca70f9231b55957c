"""ReLU that keeps each sequence's mask x <= 0 between requests (numpy, Python backend)."""
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.masks = {}

    def execute(self, requests):
        responses = []
        for request in requests:
            sequence = request.correlation_id()
            if pb_utils.get_input_tensor_by_name(request, "START").as_numpy().any():
                self.masks.pop(sequence, None)
            x = pb_utils.get_input_tensor_by_name(request, "x").as_numpy()
            mask = x <= 0
            y = x.copy()
            y[mask] = 0
            self.masks[sequence] = mask
            if pb_utils.get_input_tensor_by_name(request, "END").as_numpy().any():
                del self.masks[sequence]
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("y", y)]))
        return responses
