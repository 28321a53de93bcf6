"""What both Beam jobs share: the one decoder, safe file reads, label files, dead letters,
counters and progress, runner options, and the fixed-shard TFRecord sink."""
