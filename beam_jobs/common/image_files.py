"""Finding image files in a folder and reading one safely: only regular files, with a bound.

A folder a user gives may hold anything under an image's name: a FIFO (an unbounded read blocks
forever), a link to /dev/zero or /dev/urandom (an unbounded read exhausts memory), a broken or
looping link, a folder, a file of many gigabytes. Listing keeps every such entry (so it is
accounted for as a dead letter, never silently dropped) and `read_image_file` refuses each with
its own reason code before reading a byte of it.

Usage:
  for path in list_image_files(ImageSource.of('photos/'), IMAGE_EXTENSIONS): ...
  data = read_image_file(path, max_bytes=DEFAULT_MAX_FILE_BYTES)
"""
import contextlib
import dataclasses
import errno
import glob
import os
import stat
from typing import Iterator

from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from model.errors import InputRefused, Reason
from model.manifest import is_local_path

__all__ = ['DEFAULT_MAX_FILE_BYTES', 'ImageSource', 'list_image_files', 'read_image_file']

# A Planet chip is 20-60 KB as JPEG and about 500 KB as 4-band TIFF; 64 MB is far above any chip
# and small enough that two files being decoded at once never strain a worker.
DEFAULT_MAX_FILE_BYTES = 64 * 2**20
_READ_CHUNK = 1 << 20
_FILE_KINDS = ((stat.S_ISDIR, 'a folder'), (stat.S_ISFIFO, 'a FIFO (named pipe)'),
               (stat.S_ISCHR, 'a character device'), (stat.S_ISBLK, 'a block device'),
               (stat.S_ISSOCK, 'a socket'))
_GLOB_CHARACTERS = '*?['


@dataclasses.dataclass(frozen=True)
class ImageSource:
  """One `--input` as the job reads it.

  Attributes:
    kind: 'folder' (every image below it, recursively), 'glob' or 'file'.
    path: the folder, pattern or file; local paths absolute, so that the same folder given twice
      (as `data` and `./data/`) lists the same paths.
  """
  kind: str
  path: str

  @classmethod
  def of(cls, given: str, extensions: tuple[str, ...] = ()) -> 'ImageSource':
    """A folder that exists is taken literally, even when its name holds glob characters."""
    if is_local_path(given):
      path = os.path.abspath(os.path.expanduser(given))
      if os.path.isdir(path):
        return cls('folder', path)
      if any(c in given for c in _GLOB_CHARACTERS):
        return cls('glob', path)
      return cls('file', path)
    if any(c in given for c in _GLOB_CHARACTERS):
      return cls('glob', given)
    if given.lower().endswith(tuple(extensions)):
      return cls('file', given)
    return cls('folder', given.rstrip('/'))

  @property
  def root(self) -> str:
    """The folder or file it reads, without glob characters: what outputs must stay out of."""
    if self.kind != 'glob':
      return self.path
    parts = self.path.split('/')
    first_glob = next(i for i, p in enumerate(parts) if any(c in p for c in _GLOB_CHARACTERS))
    return '/'.join(parts[:first_glob]) or '/'

  @classmethod
  def files_in(cls, folder: str, extension: str) -> 'ImageSource':
    """The files directly in `folder` named *`extension`; the folder's name taken literally."""
    if is_local_path(folder):
      return cls('glob', os.path.join(glob.escape(os.path.abspath(folder)), '*' + extension))
    return cls('glob', FileSystems.join(folder, '*' + extension))


def _has_extension(path: str, extensions: tuple[str, ...]) -> bool:
  return path.lower().endswith(extensions)


def _walk_local(folder: str, extensions: tuple[str, ...]) -> Iterator[str]:
  # os.walk never follows links to folders (no loops); a link, FIFO, device or folder with an
  # image's name is listed like a file, so that reading it refuses it with its reason. A
  # sub-folder that cannot be listed is listed too, whatever its name: its images are unknown,
  # and reading it refuses it (UNREADABLE_FOLDER), so it is accounted for, never skipped.
  unlisted = []
  for root, dirs, files in os.walk(folder, onerror=unlisted.append):
    yield from _unlisted_folders(unlisted, folder)
    for name in sorted(files + dirs):
      if _has_extension(name, extensions):
        yield os.path.join(root, name)
  yield from _unlisted_folders(unlisted, folder)


def _unlisted_folders(errors: list[OSError], top: str) -> Iterator[str]:
  while errors:
    error = errors.pop(0)
    if error.filename == top:
      raise error   # the --input itself: a configuration error, one line before anything runs
    yield error.filename


def list_image_files(source: ImageSource, extensions: tuple[str, ...]) -> Iterator[str]:
  """Every entry of `source` whose name ends with one of `extensions` (case-insensitive)."""
  if is_local_path(source.path):
    if source.kind == 'folder':
      yield from _walk_local(source.path, extensions)
    elif source.kind == 'glob':
      # glob() sees an unreadable folder as an empty one: every image would then be missing.
      with os.scandir(source.root) if os.path.isdir(source.root) else contextlib.nullcontext():
        pass
      for path in sorted(glob.glob(source.path, recursive=True)):
        if _has_extension(path, extensions):
          yield path
    elif os.path.lexists(source.path):
      yield source.path
    return
  pattern = source.path + '/**' if source.kind == 'folder' else source.path
  for metadata in FileSystems.match([pattern])[0].metadata_list:
    if _has_extension(metadata.path, extensions):
      yield metadata.path


def _refuse_entry(path: str, error: OSError) -> InputRefused:
  if error.errno == errno.ELOOP:
    return InputRefused(Reason.BROKEN_LINK, 'a link that points to itself (a loop); '
                                            'replace it with the image file')
  if error.errno == errno.ENOENT and os.path.islink(path):
    return InputRefused(Reason.BROKEN_LINK, f'a link to {os.readlink(path)[:200]!r}, which does '
                                            'not exist; replace it with the image file')
  if error.errno == errno.ENOENT:
    return InputRefused(Reason.MISSING_IMAGE, 'the file disappeared after it was listed')
  if error.errno == errno.ENXIO:
    return InputRefused(Reason.NOT_A_REGULAR_FILE, 'a socket, not a file; remove it')
  if os.path.isdir(path) and not os.path.islink(path):
    return InputRefused(Reason.UNREADABLE_FOLDER,
                        f'a folder that cannot be read ({error.strerror}): the images in it were '
                        'not listed. Make it readable (chmod a+rx), or move it out of the input, '
                        'and run again')
  return InputRefused(Reason.UNREADABLE_FILE, f'cannot open the file ({error.strerror}); check '
                                              'its permissions')


def _too_large(size: int, max_bytes: int) -> InputRefused:
  return InputRefused(Reason.FILE_TOO_LARGE,
                      f'the file is {size} bytes, above --max_file_bytes={max_bytes}; refused '
                      'without reading it (raise the limit only for trusted input)')


def _read_local(path: str, max_bytes: int) -> bytes:
  try:
    # O_NONBLOCK: opening a FIFO must not wait for a writer. The type is then checked on the
    # open descriptor itself, so a file swapped for a FIFO after a stat() cannot slip through.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, 'O_CLOEXEC', 0))
  except OSError as e:
    raise _refuse_entry(path, e) from None
  try:
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
      kind = next((name for test, name in _FILE_KINDS if test(info.st_mode)), 'not a file')
      via = ' (through a link)' if os.path.islink(path) else ''
      raise InputRefused(Reason.NOT_A_REGULAR_FILE,
                         f'{kind}{via}, not a regular file; only image files are read')
    if info.st_size > max_bytes:
      raise _too_large(info.st_size, max_bytes)
    # The first read asks for the size fstat gave and one byte more (a file that grew is read on
    # in chunks): a bytes object of 1 MB per read, shrunk to a 30 KB chip, cost more than the read.
    chunks, total, want = [], 0, info.st_size + 1
    while chunk := os.read(fd, min(want, max_bytes + 1 - total)):
      want = _READ_CHUNK
      chunks.append(chunk)
      total += len(chunk)
      if total > max_bytes:   # it grew while we read it
        raise _too_large(total, max_bytes)
    return b''.join(chunks)
  except OSError as e:
    raise InputRefused(Reason.UNREADABLE_FILE,
                       f'cannot read the file ({e.strerror}); re-copy it') from None
  finally:
    os.close(fd)


def read_image_file(path: str, max_bytes: int = DEFAULT_MAX_FILE_BYTES) -> bytes:
  """The whole file, if it is a regular file of at most `max_bytes`; never an unbounded read.

  Raises:
    InputRefused: NOT_A_REGULAR_FILE, BROKEN_LINK, FILE_TOO_LARGE, MISSING_IMAGE or
      UNREADABLE_FILE, with what to do.
  """
  if is_local_path(path):
    return _read_local(path, max_bytes)
  try:
    matched = FileSystems.match([path])[0].metadata_list
    if not matched:
      raise InputRefused(Reason.MISSING_IMAGE, 'the file disappeared after it was listed')
    if matched[0].size_in_bytes > max_bytes:
      raise _too_large(matched[0].size_in_bytes, max_bytes)
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
      data = f.read(max_bytes + 1)
  except InputRefused:
    raise
  except Exception as e:  # pylint: disable=broad-except  # each filesystem raises its own
    raise InputRefused(Reason.UNREADABLE_FILE,
                       f'cannot read the file ({type(e).__name__}: {str(e)[:200]})') from None
  if len(data) > max_bytes:
    raise _too_large(len(data), max_bytes)
  return data
