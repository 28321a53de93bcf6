"""The README and its manual (docs/) cannot drift from the code: every command they show names
real modules and flags, every page is linked from the README, and every link resolves.

Each stage's command is also run for real by its own tests and by run_local.sh; this test checks
the guide itself: every `python -m MODULE ...` line in it names a module whose own --help lists
each flag shown, or a Beam pipeline option; every variable of run_local.sh's table is read by
run_local.sh. `tensorflow_model_server` and `docker` lines are for machines that have them (the
serving tests run against the real binary where it is on the PATH).
"""
import contextlib
import importlib
import io
import re

import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from tests.conftest import REPO

FRONT_DOOR = (REPO / 'README.md').read_text()
PAGES = sorted((REPO / 'docs').glob('*.md'))
# Everything a reader is shown: the README and every page of the manual.
README = '\n'.join([FRONT_DOOR] + [page.read_text() for page in PAGES])
# The README is a front door, not the manual: what the project is, the commands, a tour, a map.
MAX_README_LINES = 250


def _commands() -> list[tuple[str, str]]:
  """(module, whole command) for every `python -m` command in the README, in blocks or inline."""
  commands = []
  inline = re.findall(r'(?<!`)`([^`\n]*python -m [^`\n]*)`(?!`)', README)
  for block in re.findall(r'```[a-z]*\n(.*?)```', README, flags=re.S) + inline:
    joined = re.sub(r'\\\n\s*', ' ', block)
    for line in joined.splitlines():
      found = re.search(r'python -m ([\w.]+)(.*)', line)
      if found:
        commands.append((found.group(1), found.group(0)))
  return commands


def _help_text(module_name: str) -> str:
  module = importlib.import_module(module_name if module_name != 'benchmarks'
                                   else 'benchmarks.__main__')
  out = io.StringIO()
  with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as info:
    module.main(['--help'])
  assert info.value.code in (0, None)
  return out.getvalue()


BEAM_OPTIONS = set(PipelineOptions([]).get_all_options()) | {'no_auth'}


def test_the_readme_shows_every_stage():
  modules = {module for module, _ in _commands()}
  assert {'beam_jobs.make_sample', 'beam_jobs.preprocess', 'model.train', 'model.export',
          'beam_jobs.predict', 'model.serve', 'beam_jobs.compare_predictions'} <= modules


@pytest.mark.parametrize('module,command', _commands())
def test_every_flag_shown_exists(module, command):
  help_text = _help_text(module)
  for flag in re.findall(r'(?<![\w-])--([a-z][a-z0-9_]*)', command):
    assert f'--{flag}' in help_text or flag in BEAM_OPTIONS, (
        f'README shows `{command}` but {module} has no --{flag}')


def test_run_local_reads_every_variable_the_readme_lists():
  script = (REPO / 'run_local.sh').read_text()
  variables = set(re.findall(r'`(PLANET_[A-Z_]+)`', README))
  assert len(variables) >= 8
  for variable in variables:
    assert '${' + variable in script, f'README lists {variable}; run_local.sh never reads it'


def test_the_readme_is_a_front_door_that_links_every_page():
  assert len(FRONT_DOOR.splitlines()) < MAX_README_LINES
  assert len(PAGES) >= 8
  for page in PAGES:
    assert f'](docs/{page.name})' in FRONT_DOOR, f'README links no {page.name}'


@pytest.mark.parametrize('document', [REPO / 'README.md', *PAGES], ids=lambda p: p.name)
def test_every_relative_link_resolves(document):
  for target in re.findall(r'\]\(([^)#:]+)(?:#[^)]*)?\)', document.read_text()):
    assert (document.parent / target).exists(), f'{document.name} links {target}: not there'
