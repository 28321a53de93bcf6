"""The Dataflow worker image stays in step with the package: the Beam it starts from is the Beam
setup.py pins, its Python is one the package supports, and it copies what the package is made of.
(Building it needs Docker and the network; the README says how.)"""
import re

from tests.conftest import REPO

DOCKERFILE = (REPO / 'Dockerfile').read_text()
SETUP = (REPO / 'setup.py').read_text()


def test_the_image_is_beams_sdk_image_of_the_pinned_version():
  python, beam = re.search(r'^FROM apache/beam_python(\d\.\d+)_sdk:(\S+)$', DOCKERFILE,
                           re.M).groups()
  assert f"'apache-beam[gcp]=={beam}'" in SETUP
  low, high = re.search(r"python_requires='>=(\d\.\d+),<(\d\.\d+)'", SETUP).groups()
  minor = int(python.split('.')[1])
  assert int(low.split('.')[1]) <= minor < int(high.split('.')[1])


def test_the_image_installs_the_package_it_copies():
  copied = re.findall(r'^COPY (\S+) ', DOCKERFILE, re.M)
  assert sorted(copied) == ['beam_jobs', 'model', 'setup.py']
  assert all((REPO / path).exists() for path in copied)
  assert "include=['beam_jobs', 'beam_jobs.*', 'model', 'model.*']" in SETUP
  assert re.search(r'^RUN pip install --no-cache-dir \.', DOCKERFILE, re.M)
  assert 'ENTRYPOINT' not in DOCKERFILE   # Beam's worker boot must stay the entrypoint
