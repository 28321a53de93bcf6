"""The local server's answers other than OK: a gRPC status code with TF Serving's message for it."""
import grpc

__all__ = ['Refusal']


class Refusal(Exception):
  """An RPC answer other than OK, raised anywhere below a service method and sent by it.

  Attributes:
    code: the gRPC status code.
    message: TF Serving's message for the same case, word for word where it has one.
  """

  def __init__(self, code: grpc.StatusCode, message: str):
    super().__init__(message)
    self.code = code
    self.message = message
