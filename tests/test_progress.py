"""Progress lines: counted per pipeline, rate included, shown without Beam's own logging."""
import logging

import pytest

from beam_jobs.common.progress import LogProgress, show_progress_logs


class _Lines(logging.Handler):
  def __init__(self):
    super().__init__(logging.INFO)
    self.lines = []

  def emit(self, record):
    self.lines.append(record.getMessage())


@pytest.fixture
def progress_lines():
  """Lines of the progress logger, whether or not a job turned its propagation off."""
  show_progress_logs()
  handler = _Lines()
  logger = logging.getLogger('planet.progress')
  logger.addHandler(handler)
  yield lambda: handler.lines
  logger.removeHandler(handler)


def test_progress_lines_count_each_pipeline_separately(progress_lines):
  first, second = LogProgress('job a', every_seconds=0), LogProgress('job a', every_seconds=0)
  for element in range(3):
    assert list(first.process(element)) == [element]
  list(second.process('x'))
  lines = progress_lines()
  assert [line.split(',')[0] for line in lines] == [
      'job a: 1 done', 'job a: 2 done', 'job a: 3 done', 'job a: 1 done']
  assert all(line.endswith('/s') for line in lines)


def test_progress_is_quiet_between_intervals(progress_lines):
  quiet = LogProgress('job b', every_seconds=3600)
  for element in range(100):
    list(quiet.process(element))
  assert progress_lines() == []
