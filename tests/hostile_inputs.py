"""Hostile inputs that several test modules throw at the stages."""
import struct
import zlib


def png_declaring(width: int, height: int) -> bytes:
  """A tiny valid-looking PNG whose header declares width x height: a decompression bomb."""
  def chunk(kind, body):
    return struct.pack('>I', len(body)) + kind + body + struct.pack('>I', zlib.crc32(kind + body))
  header = struct.pack('>IIBBBBB', width, height, 8, 2, 0, 0, 0)
  idat = zlib.compress(b'\x00' * 1024)
  return b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', header) + chunk(b'IDAT', idat) + chunk(b'IEND', b'')
