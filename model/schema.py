"""The contracts between stages: label vocabulary, tf.Example keys, model I/O names, file names.

Plain Python on purpose (no TensorFlow import): Beam workers, the training module, the local
server and the tests all import this one module, so every fact below is written exactly once.
"""

__all__ = [
    'ALL_LABELS', 'CHANNELS', 'COMPRESSIONS', 'COUNTS_FILE', 'DEAD_LETTERS_DIR',
    'DEFAULT_GROUND_THRESHOLD', 'DEFAULT_IMAGE_SIZE', 'DEFAULT_LABEL_RULE', 'EVAL_HALVES',
    'EXPORT_CHECKSUMS_FILE', 'EXPORT_INFO_FILE', 'FLOAT_SIGNATURE', 'GROUND_LABELS',
    'INPUT_FLOAT', 'INPUT_IMAGES', 'KEY_GROUND', 'KEY_NAME', 'KEY_PIXELS', 'KEY_SHA256',
    'KEY_SHAPE', 'KEY_WEATHER', 'LABEL_RULES', 'LABEL_RULE_CLOUDY_NO_GROUND', 'LABEL_RULE_NONE',
    'MANIFEST_FILE', 'MODEL_NAME', 'NUM_GROUND', 'NUM_WEATHER', 'OUTPUT_GROUND', 'OUTPUT_NAMES',
    'OUTPUT_WEATHER', 'PREDICTIONS_PREFIX', 'REPORT_FILE', 'SERVING_SIGNATURE',
    'SHARD_SUFFIXES', 'SPLITS', 'STAGE_PREDICT', 'STAGE_PREPROCESS', 'STAGE_TRAIN',
    'SUBMISSION_FILE', 'SUMMARY_FILE', 'TIMESTAMP_FORMAT', 'TTA_SIGNATURE', 'WEATHER_LABELS'
]

# The original tutorial's label order, so its label CSV (KagglePlanetMCML.csv) stays usable.
# `artisinal_mine` is the real (misspelt) Kaggle tag.
WEATHER_LABELS = ('clear', 'cloudy', 'haze', 'partly_cloudy')
GROUND_LABELS = (
    'agriculture', 'artisinal_mine', 'bare_ground', 'blooming', 'blow_down',
    'conventional_mine', 'cultivation', 'habitation', 'primary', 'road',
    'selective_logging', 'slash_burn', 'water',
)
ALL_LABELS = WEATHER_LABELS + GROUND_LABELS
NUM_WEATHER = len(WEATHER_LABELS)
NUM_GROUND = len(GROUND_LABELS)

# Pixels every stage works at unless told otherwise: a 256x256 chip halves exactly, which lets the
# JPEG decoder scale in the DCT domain (draft) instead of decoding full size.
DEFAULT_IMAGE_SIZE = 128
CHANNELS = 3

# tf.train.Example feature keys (written by beam_jobs.preprocess, read by model.dataset).
KEY_NAME = 'image/name'          # bytes: the image name (file stem)
KEY_SHA256 = 'image/sha256'      # bytes: hex sha256 of the source file
KEY_PIXELS = 'image/pixels'      # bytes: raw uint8 RGB, row-major H x W x 3
KEY_SHAPE = 'image/shape'        # int64 [3]: H, W, 3
KEY_WEATHER = 'label/weather'    # float [4]: one-hot; all zeros when the row has no weather tag
KEY_GROUND = 'label/ground'      # float [13]: multi-hot

# Model I/O names, shared by the export, the in-process handler, the gRPC client and the server.
MODEL_NAME = 'PlanetModel'
SERVING_SIGNATURE = 'serving_default'   # input INPUT_IMAGES: uint8 [batch, H, W, 3]
FLOAT_SIGNATURE = 'predict_float'       # input INPUT_FLOAT: float32 [batch, H, W, 3] in [0, 1]
# Test-time augmentation: SERVING_SIGNATURE's input and outputs, each output the mean over the 8
# flips/rotations of the chip (exports made before it existed lack it: re-export them).
TTA_SIGNATURE = 'serving_tta'
INPUT_IMAGES = 'images'
INPUT_FLOAT = 'input_image'
OUTPUT_WEATHER = 'weather'              # float32 [batch, 4], softmax
OUTPUT_GROUND = 'ground'                # float32 [batch, 13], sigmoid
OUTPUT_NAMES = (OUTPUT_WEATHER, OUTPUT_GROUND)

# Files inside an export version folder, PlanetModel/<N>/.
EXPORT_INFO_FILE = 'assets.extra/planet.json'   # label order, thresholds, image size, metrics
EXPORT_CHECKSUMS_FILE = 'assets.extra/SHA256SUMS'

# Every stage writes this last, after all its outputs are complete; the next stage refuses
# an output folder without it.
MANIFEST_FILE = 'manifest.json'

# Stage names: what each stage's manifest (and claim file) says, and what the next one checks.
STAGE_PREPROCESS = 'preprocess'
STAGE_TRAIN = 'train'
STAGE_PREDICT = 'predict'

# The splits of a preprocess output, each a folder of shards (model.dataset reads both).
SPLITS = ('train', 'eval')
# model.train's halves of the eval split, by a hash of the image name (model.dataset.eval_half):
# the ground thresholds are tuned on the first and scored, honestly, on the second.
EVAL_HALVES = ('tuning', 'test')
# TFRecord compression: the --compression names and the suffix of a shard written with each.
SHARD_SUFFIXES = {'none': '.tfrecord', 'gzip': '.tfrecord.gz'}
COMPRESSIONS = tuple(SHARD_SUFFIXES)

# Output files of the Beam jobs, relative to their --output_dir. Both jobs write their dead
# letters as DEAD_LETTERS_DIR/dead_letters-SSSSS-of-NNNNN.jsonl.
DEAD_LETTERS_DIR = 'dead_letters'
COUNTS_FILE = 'counts.json'          # preprocess: the pipeline's own tally
PREDICTIONS_PREFIX = 'predictions'   # predict: predictions-SSSSS-of-NNNNN.jsonl
SUBMISSION_FILE = 'submission.csv'
SUMMARY_FILE = 'summary.json'
REPORT_FILE = 'report.html'

# UTC, second precision: every timestamp a stage writes (manifests, summaries, reports).
TIMESTAMP_FORMAT = '%Y-%m-%dT%H:%M:%SZ'

# Decision threshold for a ground label when an export carries none (the tutorial's choice).
DEFAULT_GROUND_THRESHOLD = 0.2

# How probabilities become tags (model.metrics.decide), the same in training's evaluation and in
# every prediction backend. `cloudy_no_ground`: a chip whose decided weather is cloudy gets no
# ground tags (in the real labels cloudy never appears with another tag); `none`: each ground
# label by its threshold alone.
LABEL_RULE_CLOUDY_NO_GROUND = 'cloudy_no_ground'
LABEL_RULE_NONE = 'none'
LABEL_RULES = (LABEL_RULE_CLOUDY_NO_GROUND, LABEL_RULE_NONE)
DEFAULT_LABEL_RULE = LABEL_RULE_CLOUDY_NO_GROUND
