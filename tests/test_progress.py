"""Progress: counted per pipeline and per process, added up by the driver, shown as lines with
done / total, percent, rate and time left on a stream that is not a terminal."""
import io
import os
import pathlib
import pty
import re
import select
import time

import apache_beam as beam
from apache_beam.testing import test_pipeline

from beam_jobs.common.progress import (CountProgress, ProgressTally, ShowProgress, count_progress,
                                        progress_line)

# done/total unit (percent), rate, time left: what a person reading a log needs.
PROGRESS_LINE = re.compile(
    r'^(?P<what>\w+): (?P<done>[\d,]+)/(?P<total>[\d,]+) (?P<unit>[\w ]+) \((?P<percent>\d+)%\), '
    r'(?P<rate>[\d,.]+|-)/s, (?P<left>\d+:\d\d:\d\d|-:--:--) left$')


def test_a_progress_line_says_done_total_percent_rate_and_time_left():
  line = progress_line('predict', 1234, 10000, 'images', 100.0)
  assert line == 'predict: 1,234/10,000 images (12%), 100.0/s, 0:01:28 left'
  assert PROGRESS_LINE.match(line)
  before_any_rate = progress_line('preprocess', 0, 240, 'CSV rows', None)
  assert before_any_rate == 'preprocess: 0/240 CSV rows (0%), -/s, -:--:-- left'
  assert PROGRESS_LINE.match(before_any_rate)
  assert progress_line('predict', 7, 7, 'images', 3.5).endswith('(100%), 3.5/s, 0:00:00 left')
  assert progress_line('predict', 3_600, 7_200, 'images', 1.0).endswith('1:00:00 left')


def test_counts_are_per_pipeline_and_added_up_across_processes():
  first, second = ProgressTally.create(), ProgressTally.create()
  try:
    counting = CountProgress(first.folder)
    counting.setup()
    assert [list(counting.process(e)) for e in range(3)] == [[0], [1], [2]]
    counting.finish_bundle()
    other = CountProgress(second.folder)
    other.setup()
    list(other.process('x'))
    other.finish_bundle()
    # Another worker process of the same run (multi_processing) writes its own file.
    (pathlib.Path(first.folder) / '999999').write_text('5')
    assert first.done() == 3 + 5 and second.done() == 1
  finally:
    first.remove()
    second.remove()


def test_without_a_folder_nothing_is_counted():
  counting = CountProgress(None)   # a test pipeline, or a Dataflow worker
  counting.setup()
  assert list(counting.process('x')) == ['x']
  missing = CountProgress('/nonexistent/planet-progress-folder')
  missing.setup()
  assert list(missing.process('y')) == ['y']


def test_a_pipeline_counts_into_the_tally_the_driver_shows():
  tally = ProgressTally.create()
  stream = io.StringIO()   # not a terminal: plain lines
  with ShowProgress('job', 50, 'things', tally, stream=stream, every_seconds=0.05,
                    poll_seconds=0.01):
    with test_pipeline.TestPipeline() as p:
      _ = p | beam.Create(range(50)) | beam.ParDo(CountProgress(tally.folder))
    folder = tally.folder
  lines = stream.getvalue().splitlines()
  assert lines and all(PROGRESS_LINE.match(line) for line in lines), lines
  last = PROGRESS_LINE.match(lines[-1])
  assert (last['done'], last['total'], last['percent'], last['left']) == (
      '50', '50', '100', '0:00:00')
  assert not os.path.exists(folder)   # the driver's folder is gone with the run


def test_no_tally_shows_nothing():
  stream = io.StringIO()
  with ShowProgress('job', 10, 'things', None, stream=stream, every_seconds=0):
    pass
  assert stream.getvalue() == ''


def test_on_a_terminal_the_progress_is_a_live_bar():
  controller, terminal = pty.openpty()
  tally = ProgressTally.create()
  (pathlib.Path(tally.folder) / '12345').write_text('25')   # a worker's count
  with os.fdopen(terminal, 'w') as stream:
    with ShowProgress('job', 50, 'things', tally, stream=stream, poll_seconds=0.01):
      time.sleep(0.2)
  shown = b''
  try:
    while select.select([controller], [], [], 0.2)[0]:
      shown += os.read(controller, 65536)
  except OSError:
    pass   # Linux: EIO once the terminal side is closed and read to its end
  os.close(controller)
  text = shown.decode('utf-8', 'replace')
  assert '\x1b[' in text   # drawn in place, not line after line
  assert 'job:' in text and '25/50' in text and '50%' in text and 'left' in text, text



def test_a_stage_shorter_than_the_interval_prints_one_line():
  tally = ProgressTally.create()
  (pathlib.Path(tally.folder) / '12345').write_text('7')
  stream = io.StringIO()
  with ShowProgress('job', 7, 'things', tally, stream=stream, poll_seconds=0.01):
    time.sleep(0.1)
  lines = stream.getvalue().splitlines()
  assert len(lines) == 1 and lines[0].startswith('job: 7/7 things (100%), '), lines


def test_a_first_pass_is_shown_beside_the_count_until_the_stage_is_done():
  # preprocess reads the whole CSV before its join settles a row: the 'read' phase moves first.
  assert (progress_line('preprocess', 0, 1_000_000, 'CSV rows', None, {'read': 400_000})
          == 'preprocess: 0/1,000,000 CSV rows (0%), -/s, -:--:-- left, 400,000 read')
  assert PROGRESS_LINE.match(progress_line('preprocess', 9, 9, 'CSV rows', 2.0, {'read': 9}))
  tally = ProgressTally.create()
  try:
    count_progress(tally.folder, 1500, write_now=True, phase='read')
    count_progress(tally.folder, 20, write_now=True)
    (pathlib.Path(tally.folder) / 'read~999999').write_text('500')   # another process's pass
    assert tally.counts() == {'read': 2000, '': 20} and tally.done() == 20
  finally:
    tally.remove()
