"""Pre-allocated, pre-bound inputs and outputs for the single-observation path.

On CPU the bound OrtValues wrap our numpy buffers, so a call writes the new observation
into a buffer and runs: no per-call allocation, no dict of feeds, no output copies. On CUDA
the inputs live in device memory allocated once and are refreshed in place
(``OrtValue.update_inplace``: one host-to-device copy per input), and the outputs are bound
to our host buffers (one device-to-host copy into memory we own).
"""
from __future__ import annotations

import numpy as np
import onnxruntime as ort

from vdd_ros.runtime.session import CUDA


class BoundCall:
    def __init__(self, session: ort.InferenceSession, provider: str, device_id: int,
                 inputs: dict[str, tuple[tuple[int, ...], type]], outputs: dict[str, tuple[tuple[int, ...], type]]):
        self._session = session
        self.inputs = {name: np.zeros(shape, dtype) for name, (shape, dtype) in inputs.items()}
        self.outputs = {name: np.zeros(shape, dtype) for name, (shape, dtype) in outputs.items()}
        self._binding = session.io_binding()
        self._device_inputs: list[tuple[ort.OrtValue, np.ndarray]] = []
        for name, host in self.inputs.items():
            if provider == CUDA:
                device_value = ort.OrtValue.ortvalue_from_shape_and_type(host.shape, host.dtype, "cuda", device_id)
                self._binding.bind_ortvalue_input(name, device_value)
                self._device_inputs.append((device_value, host))
            else:
                self._binding.bind_cpu_input(name, host)  # the OrtValue is backed by ``host`` itself
        for name, host in self.outputs.items():
            self._binding.bind_output(name, "cpu", 0, host.dtype, host.shape, host.ctypes.data)

    def run(self) -> dict[str, np.ndarray]:
        """Run on the current contents of ``inputs``; results land in ``outputs`` (reused buffers)."""
        for device_value, host in self._device_inputs:
            device_value.update_inplace(host)
        self._session.run_with_iobinding(self._binding)
        return self.outputs
