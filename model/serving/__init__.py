"""TF Serving's gRPC API, spoken by the prediction client and by a local server for tests.

Modules:
  protocol: what client and server share (message-size limit, address and channel rules,
    request encoding, response reading).
  refusal, repository, faults, services, local_server: the TF Serving-compatible local server
    (`LocalServingServer`) that `python -m model.serve` runs.
  model_server: the real `tensorflow_model_server` as a child process, for the same tests.
"""

__all__: list[str] = []
