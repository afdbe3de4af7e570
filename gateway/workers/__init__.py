"""Model workers: isolated processes that each hold one ONNX Runtime session.

The worker side (``worker``, ``batcher``, ``isolation``) never imports ``gateway.security`` or
``gateway.audit``: a worker holds no identities, keys or policies. The gateway side starts them
(``supervisor``) and talks to them over Unix sockets (``pool``).
"""
