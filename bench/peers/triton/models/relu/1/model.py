"""Stateless ReLU with numpy: the classic forward, nothing kept."""
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "x").as_numpy()
            y = x.copy()
            y[x <= 0] = 0
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("y", y)]))
        return responses
