"""Typed refusals: every input a stage cannot use becomes one of these, with a reason code.

A dead letter is written from an `InputRefused`: the code says which rule refused the input,
the message says what the user can do about it. Codes are stable strings;
docs/failure_reasons.md lists them.
"""
import enum

__all__ = ['InputRefused', 'Reason']


class Reason(str, enum.Enum):
  # Image decoding.
  EMPTY_FILE = 'EMPTY_FILE'
  NOT_AN_IMAGE = 'NOT_AN_IMAGE'
  TRUNCATED_IMAGE = 'TRUNCATED_IMAGE'
  CORRUPT_IMAGE = 'CORRUPT_IMAGE'
  TOO_MANY_PIXELS = 'TOO_MANY_PIXELS'
  UNSUPPORTED_PIXELS = 'UNSUPPORTED_PIXELS'
  UNSUPPORTED_BANDS = 'UNSUPPORTED_BANDS'
  # Label rows.
  MALFORMED_ROW = 'MALFORMED_ROW'
  UNKNOWN_TAG = 'UNKNOWN_TAG'
  EMPTY_TAGS = 'EMPTY_TAGS'
  MULTIPLE_WEATHER = 'MULTIPLE_WEATHER'
  BAD_IMAGE_NAME = 'BAD_IMAGE_NAME'
  DUPLICATE_NAME = 'DUPLICATE_NAME'
  # Joining rows with files.
  MISSING_IMAGE = 'MISSING_IMAGE'
  IMAGE_WITHOUT_ROW = 'IMAGE_WITHOUT_ROW'
  UNREADABLE_FILE = 'UNREADABLE_FILE'
  UNREADABLE_FOLDER = 'UNREADABLE_FOLDER'   # a folder under an input that cannot be listed
  # What sits in a folder under an image's name but is not safe to read as one.
  NOT_A_REGULAR_FILE = 'NOT_A_REGULAR_FILE'
  BROKEN_LINK = 'BROKEN_LINK'
  FILE_TOO_LARGE = 'FILE_TOO_LARGE'
  # Inference.
  INFERENCE_FAILED = 'INFERENCE_FAILED'
  UNAVAILABLE = 'UNAVAILABLE'

  def __str__(self):
    return self.value


class InputRefused(ValueError):
  """An input that a stage cannot use, with the rule that refused it.

  Attributes:
    reason: a `Reason`.
    message: what was wrong and what to do about it.
  """

  def __init__(self, reason: Reason, message: str):
    super().__init__(f'{reason.value}: {message}')
    self.reason = Reason(reason)
    self.message = message
