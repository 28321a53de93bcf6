"""TF Serving's gRPC and REST APIs, spoken by the prediction clients and by a local test server.

Modules:
  protocol: what client and server share (message-size limit, address and channel rules,
    request encoding, response reading).
  refusal, repository, faults, services, local_server: the TF Serving-compatible local server
    (`LocalServingServer`) that `python -m model.serve` runs.
  model_server: the real `tensorflow_model_server` as a child process, for the same tests.
  rest_protocol: what the REST client and server share (paths, HTTP statuses, errors).
  rest_json, rest_tensors, rest_answers, rest_arrays, rest_api, rest_server: the local server's
    REST API (bodies read by rapidjson's rules, JSON tensors in, answers out as json_tensor.cc
    writes them, big numeric arrays read by numpy, routes answered by `services`, HTTP by
    aiohttp).
"""

__all__: list[str] = []
