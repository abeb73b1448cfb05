"""The exported decoder as the runtime sees it: an ONNX Runtime session and one forward step.

:class:`OnnxDecoder` is a stateless view of the bundle's ``model.onnx``: input/output names come
from the manifest and are checked against the session with the one set of I/O rules
(:func:`~qpo_middleware.bundle.check_model_io`), dtypes come from the session. :func:`make_session`
opens the session with the providers a :class:`~qpo_middleware.config.RuntimeConfig` asks for.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np

from .bundle import LOGITS_TO_KEEP, BundleError, ModelSpec, check_model_io
from .config import RuntimeConfig, ort  # ort: ONNX Runtime, imported with the install fix

logger = logging.getLogger("qpo_middleware.runtime")

_ORT_DTYPES: dict[str, type[np.generic]] = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
}


def session_providers(provider: str) -> list[str]:
    """ONNX Runtime providers for a ``RuntimeConfig.provider`` value (``auto`` falls back to CPU, logged)."""
    available = ort.get_available_providers()
    if provider == "auto":
        if "CUDAExecutionProvider" in available:
            provider = "cuda"
        else:
            logger.info("qpo: no CUDAExecutionProvider in this onnxruntime (%s); running on CPU.", ", ".join(available))
            provider = "cpu"
    if provider == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise RuntimeError(
                "provider='cuda' asked for, but this onnxruntime has no CUDAExecutionProvider "
                f"(available: {', '.join(available)}). Install the GPU build instead of the CPU one: "
                "pip uninstall -y onnxruntime && pip install 'qpo-middleware[gpu]' (onnxruntime-gpu), "
                "or use provider='cpu'."
            )
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if provider == "cpu":
        return ["CPUExecutionProvider"]
    raise ValueError(f"provider must be 'auto', 'cpu' or 'cuda'; got {provider!r}.")


def make_session(model_path: str | os.PathLike[str], config: RuntimeConfig) -> ort.InferenceSession:
    """An ONNX Runtime session for the bundle's model, with a logged fallback when CUDA does not start."""
    providers = session_providers(config.provider)
    session = ort.InferenceSession(str(model_path), sess_options=config.session_options(), providers=providers)
    if providers[0] == "CUDAExecutionProvider" and session.get_providers()[0] != "CUDAExecutionProvider":
        # onnxruntime-gpu lists CUDA but could not start it (no driver, missing CUDA/cuDNN libraries).
        logger.warning(
            "qpo: the CUDA execution provider did not start (check the CUDA and cuDNN libraries that "
            "onnxruntime-gpu needs); running on %s instead.", session.get_providers()[0]
        )
    return session


class OnnxDecoder:
    """Stateless view of the exported decoder: names come from the manifest, dtypes from the session.

    With ``io_binding`` the presents stay ORT values on the session's device and are bound as
    the next step's past (on CUDA the KV cache never visits the host; only the last
    position's logits are read back).
    """

    def __init__(self, session: ort.InferenceSession, spec: ModelSpec, io_binding: bool = False) -> None:
        self.session = session
        self.spec = spec
        self.io_binding = io_binding
        self.device = "cuda" if session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        inputs = {i.name: i for i in session.get_inputs()}
        check_model_io(spec, inputs, (o.name for o in session.get_outputs()), "The ONNX model")
        self.past_names = spec.past_names()
        self.present_names = spec.present_names()

        def dtype(name: str) -> type[np.generic]:
            kind = inputs[name].type
            if kind not in _ORT_DTYPES:
                raise BundleError(f"ONNX input {name!r} has unsupported type {kind}.")
            return _ORT_DTYPES[kind]

        self.ids_dtype = dtype("input_ids")
        self.mask_dtype = dtype("attention_mask")
        self.pos_dtype = dtype("position_ids") if spec.has_position_ids else np.int64
        self.kv_dtype = dtype(self.past_names[0][0])
        self.output_names = ["logits"] + [n for pair in self.present_names for n in pair]

    def empty_past(self, batch: int) -> list[np.ndarray]:
        """A past of length 0 for every layer's key and value: (batch, kv_heads, 0, head_dim)."""
        shape = (batch, self.spec.num_kv_heads, 0, self.spec.head_dim)
        return [np.zeros(shape, dtype=self.kv_dtype) for _ in range(2 * self.spec.num_layers)]

    def forward(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        position_ids: np.ndarray,
        past: list[Any],
        all_positions: bool = False,
    ) -> tuple[np.ndarray, list[Any]]:
        """One run. Returns (last-position logits as float32 (batch, vocab), presents in past order).

        ``past`` holds numpy arrays, or ORT values from the previous step with IO binding. With
        ``all_positions`` the logits of every input position come back, (batch, seq, vocab), as a
        speculative step's verification needs.
        """
        feeds: dict[str, Any] = {
            "input_ids": input_ids.astype(self.ids_dtype, copy=False),
            "attention_mask": attention_mask.astype(self.mask_dtype, copy=False),
        }
        if self.spec.has_position_ids:
            feeds["position_ids"] = position_ids.astype(self.pos_dtype, copy=False)
        if self.spec.logits_to_keep:  # logits of the positions read: the last one, or all to verify a draft
            feeds[LOGITS_TO_KEEP] = np.array([input_ids.shape[1] if all_positions else 1], dtype=np.int64)
        for (key_name, value_name), i in zip(self.past_names, range(0, len(past), 2), strict=True):
            feeds[key_name] = past[i]
            feeds[value_name] = past[i + 1]
        if self.io_binding:
            logits, presents = self._forward_bound(feeds)
        else:
            logits, *presents = self.session.run(self.output_names, feeds)
        # logits: (batch, seq, vocab); in plain decoding only the last position decides the next token.
        return np.asarray(logits if all_positions else logits[:, -1, :], dtype=np.float32), presents

    def _forward_bound(self, feeds: dict[str, Any]) -> tuple[np.ndarray, list[Any]]:
        binding = self.session.io_binding()
        for name, value in feeds.items():
            if isinstance(value, ort.OrtValue):
                binding.bind_ortvalue_input(name, value)
            else:
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for name in self.output_names:
            binding.bind_output(name, self.device)
        self.session.run_with_iobinding(binding)
        logits, *presents = binding.get_outputs()
        # On CUDA this copies the whole (batch, seq, vocab) block; at a decode step seq is 1.
        return logits.numpy(), presents

    def take_rows(self, past: list[Any], keep: np.ndarray) -> list[Any]:
        """The past of the rows in ``keep`` (a boolean mask): ORT values come to the host once for it."""
        return [(p.numpy() if isinstance(p, ort.OrtValue) else p)[keep] for p in past]

    def trim_past(self, past: list[Any], length: int) -> list[Any]:
        """The first ``length`` positions of a host past (positions after them were never accepted).

        ORT values (IO binding) stay as they are: masked-out positions are harmless, and trimming
        them would bring the cache to the host.
        """
        return [p if isinstance(p, ort.OrtValue) else p[:, :, :length] for p in past]
