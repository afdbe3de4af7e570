"""atheris target: the Open Inference Protocol decoders and the signature checks.

    python tests/fuzz/fuzz_oip.py -max_total_time=300 -rss_limit_mb=2048 tests/fuzz/corpus/oip/

An input's first byte picks the mode: even, a JSON body; odd, the binary tensor extension, with
the next two bytes (little-endian, modulo the body's length + 2) as Inference-Header-Content-Length.
The only acceptable failures are the gateway's own 4xx errors; anything else is a crash. Inputs
that crashed join ``corpus/oip/`` and the ordinary test run replays the whole corpus.
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["gateway", "gateway_client"]):
    from gateway.errors import GatewayError
    from gateway.registry.manifest import Manifest, TensorSpec
    from gateway.registry.signature import Signature, check_inputs
    from gateway_client.protocol.codec import DecodeLimits, decode_infer_request, encode_infer_response
    from gateway_client.protocol.errors import ProtocolError

LIMITS = DecodeLimits(max_elements=1 << 20)
DIGITS = Manifest("digits", "1", Path("."), (TensorSpec("input", "FP32", (-1, 64), 0.0, 16.0),),
                  (TensorSpec("probabilities", "FP32", (-1, 10)),), "0" * 64)
TEXT = Manifest("text", "1", Path("."), (TensorSpec("input", "BYTES", (-1,)),), (), "0" * 64)


def split(data: bytes) -> tuple[bytes, int | None]:
    if not data:
        return b"", None
    mode, body = data[0], data[1:]
    if mode % 2 == 0:
        return body, None
    return body[2:], int.from_bytes(body[:2], "little") % (len(body) + 2)


def one_input(data: bytes) -> None:
    body, header_length = split(data)
    for manifest in (DIGITS, TEXT):  # as the gateway decodes: the model's signature sees each tensor first
        try:
            decode_infer_request(body, header_length, LIMITS, Signature(manifest.inputs, manifest.name).expect)
        except ProtocolError:
            pass  # the gateway answers it 400
        except GatewayError as exc:
            assert 400 <= exc.status < 500, exc
    try:
        request = decode_infer_request(body, header_length, LIMITS)
    except ProtocolError:
        return
    for manifest in (DIGITS, TEXT):
        try:
            inputs = check_inputs(manifest, request.inputs)
        except GatewayError as exc:
            assert exc.status == 422, exc
            continue
        # What passed the checks must also encode back (the response path uses the same codec).
        encode_infer_response(manifest.name, "1", inputs, {t.name for t in inputs[:1]}, request.id)


def main() -> None:
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
