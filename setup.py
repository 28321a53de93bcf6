"""Package for users (pip install -e .) and for Dataflow workers (--setup_file ./setup.py)."""
import setuptools

REQUIRED_PACKAGES = [
    'apache-beam[gcp]==2.77.0',
    'tensorflow==2.21.*',
    'tensorflow-serving-api==2.21.*',
    'grpcio',
    # TF Serving's generated protos need >=6.31.1; Beam 2.77 needs <7.
    'protobuf>=6.31.1,<7',
    'pillow',
    # The local server's REST API (TF Serving's JSON API): aiohttp serves HTTP, orjson reads and
    # writes the JSON tensors (numpy arrays, float32 written exactly); the REST backend's client.
    'aiohttp>=3.9',
    'orjson>=3.9',
    'requests>=2.31',
    # The live progress bar of a stage on a terminal (beam_jobs/common/progress.py).
    'rich>=13',
]

setuptools.setup(
    name='planet-batch',
    version='0.1.0',
    description='Beam data prep, tf.keras training and bulk batch inference for the Planet chips.',
    python_requires='>=3.10,<3.13',
    packages=setuptools.find_packages(include=['beam_jobs', 'beam_jobs.*', 'model', 'model.*']),
    install_requires=REQUIRED_PACKAGES,
    # The tests' GCS emulator: gs:// paths end to end on loopback (tests/test_gcs.py).
    extras_require={'test': ['pytest', 'hypothesis', 'gcp-storage-emulator']},
)
