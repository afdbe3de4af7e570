"""ONNX Runtime sessions for a worker: the execution providers a device asks for, the CUDA
libraries they need (found and loaded before a CUDA session starts, and checked by the cuda image),
and the inputs as a session takes them."""

from __future__ import annotations

import ctypes
import sys
from pathlib import Path
from typing import Any

import numpy as np

from gateway.workers.exits import ExitCode
from gateway_client.protocol.codec import Tensor

__all__ = ["NotText", "cuda_problem", "load_session", "providers_for", "session_inputs"]


def _cuda_driver_present() -> bool:
    # onnxruntime-gpu lists the CUDA provider as available even where no driver exists, then
    # logs errors while falling back; "auto" asks for CUDA only where the driver library loads.
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


def _preload_cuda_wheels() -> None:
    """Load the CUDA and cuDNN libraries of NVIDIA's wheels (the cuda image installs them, from
    onnxruntime-gpu's ``[cuda,cudnn]`` extras), which the dynamic loader would not find alone."""
    import importlib.util

    import onnxruntime as ort

    if importlib.util.find_spec("nvidia") is not None and hasattr(ort, "preload_dlls"):
        ort.preload_dlls(directory="")


def cuda_problem() -> str | None:
    """Why the CUDA execution provider cannot load here, or None: the driver, then the provider
    library with every CUDA and cuDNN library it links (the check the cuda image runs at start)."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return f"this ONNX Runtime has no CUDA provider (available: {ort.get_available_providers()})"
    if not _cuda_driver_present():
        return "libcuda.so.1 does not load: no NVIDIA driver is visible (run with a GPU and the NVIDIA runtime)"
    _preload_cuda_wheels()
    library = Path(ort.__file__).parent / "capi" / "libonnxruntime_providers_cuda.so"
    try:
        ctypes.CDLL(str(library))
    except OSError as exc:
        return f"the CUDA provider does not load: {exc}"
    return None


def providers_for(device: str, available: list[str], tf32: bool = False) -> list[Any]:
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device == "cuda" or ("CUDAExecutionProvider" in available and _cuda_driver_present()):
        cuda_options = {
            # Dynamic batching gives every batch size its own input shape; an exhaustive cuDNN
            # algorithm search on each new shape stalls the first batches of that size for
            # hundreds of milliseconds.
            "cudnn_conv_algo_search": "HEURISTIC",
            # Full FP32 by default, so answers do not depend on the device they ran on.
            "use_tf32": "1" if tf32 else "0",
        }
        return [("CUDAExecutionProvider", cuda_options), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def load_session(model: bytes, device: str, intra_op_threads: int, tf32: bool = False, spinning: bool = True) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1
    # Spinning (ONNX Runtime's default) saves wake-ups inside a run and burns CPU between runs.
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    options.log_severity_level = 3
    wanted = providers_for(device, ort.get_available_providers(), tf32)
    if wanted[0] != "CPUExecutionProvider":
        _preload_cuda_wheels()
    session = ort.InferenceSession(model, sess_options=options, providers=wanted)
    # Asking for CUDA where it cannot run only logs and falls back to the CPU: check what is active.
    if device == "cuda" and "CUDAExecutionProvider" not in session.get_providers():
        print(
            f"device = \"cuda\" but the CUDA execution provider is not active "
            f"(active: {session.get_providers()}, available: {ort.get_available_providers()})",
            file=sys.stderr,
        )
        sys.exit(ExitCode.DEVICE)
    return session


class NotText(ValueError):
    """A BYTES input that ONNX Runtime cannot take: its elements must be UTF-8 text."""


def session_inputs(tensors: list[Tensor]) -> dict[str, np.ndarray]:
    """Decoded tensors as ``InferenceSession.run`` takes them. Its Python API takes string tensors
    as ``str`` objects and turns any other object into its ``repr``: a ``bytes`` element would
    reach the model as ``"b'...'"``. BYTES elements are therefore decoded as UTF-8, and ones that
    are not UTF-8 (a manifest may allow them with ``"encoding": "binary"``) are refused."""
    inputs = {}
    for tensor in tensors:
        array = tensor.array
        if array.dtype == object:
            text = np.empty(array.shape, dtype=object)
            flat = text.reshape(-1)
            for i, element in enumerate(array.reshape(-1)):
                try:
                    flat[i] = element.decode("utf-8") if isinstance(element, bytes) else element
                except UnicodeDecodeError:
                    raise NotText(f"inputs[{tensor.name!r}]: element {i} is not UTF-8, and ONNX Runtime takes "
                                  "string tensors as UTF-8 text") from None
            array = text
        inputs[tensor.name] = array
    return inputs
